"""Where a colocated vLLM engine runs: its executor, its rank and GPU, and the environment vLLM reads for them.

vLLM 0.32 facts this module is built on (``v1/executor/uniproc_executor.py``, ``config/parallel.py``,
``v1/worker/gpu_worker.py``):

- The ``uni`` executor (one process, TP 1) always puts its worker on GPU index 0: the device string has no
  index, and ``init_device`` then calls ``torch.accelerator.set_device_index`` *in the trainer's process*.
- The ``external_launcher`` executor (one engine per trainer process, TRL's colocate mode) reads
  ``os.environ["RANK"]`` and ``["LOCAL_RANK"]`` and uses ``LOCAL_RANK`` as the GPU index. Lightning's own
  launcher sets no ``RANK`` (and no ``LOCAL_RANK`` on rank 0); SLURM sets neither. :func:`launcher_env` sets both
  from the trainer's process group and current device for the engine's creation.
- With ``tensor_parallel_size > 1`` and no backend named, vLLM picks ``mp``: workers in other processes, every
  ``collective_rpc`` argument pickled. Only ``uni`` and ``external_launcher`` run the worker in this process,
  where a generator can be handed over by reference (:func:`worker_in_process`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch

IN_PROCESS_BACKENDS = ("uni", "external_launcher")


def trainer_group() -> tuple[int, int]:
    """``(rank, world size)`` of the trainer's default process group; ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def executor_backend(gpu: bool, in_process: bool, tensor_parallel_size: int, world_size: int,
                     requested: str | None) -> str | None:
    """The ``distributed_executor_backend`` to pass (``None``: vLLM's own choice), or a clear error for a layout
    that cannot work.

    On GPUs with TP 1 in process: ``external_launcher`` for every world size (so the engine sits on the trainer's
    GPU, not on GPU 0). TP > 1 in one trainer process: vLLM's ``mp`` workers. TP > 1 with several trainer ranks is
    refused: the external launcher needs every rank of a TP group to submit the same prompts in lockstep, and the
    ranks here explore different tasks.
    """
    if gpu and tensor_parallel_size > 1 and world_size > 1:
        raise ValueError(
            f"VLLMEngine: tensor_parallel_size={tensor_parallel_size} with {world_size} trainer ranks is not supported: "
            "the ranks of one TP group would have to generate the same prompts in lockstep, and each rank explores "
            "its own tasks. Use tensor_parallel_size 1 (one engine per GPU) or train in one process.")
    if gpu and world_size > 1 and not in_process:
        raise ValueError(f"VLLMEngine: in_process=false starts one engine process per trainer rank, which vLLM cannot "
                         f"place on {world_size} ranks' GPUs: use in_process true (the default)")
    if requested is not None:
        return requested
    if gpu and in_process and tensor_parallel_size == 1:
        return "external_launcher"
    return None


def worker_in_process(backend: str | None, in_process: bool, tensor_parallel_size: int) -> bool:
    """Whether vLLM's worker runs in this process (weights can then be passed by reference, not pickled)."""
    if not in_process:
        return False
    if backend is None:  # vLLM's choice: uni for TP 1, mp above
        return tensor_parallel_size == 1
    return backend in IN_PROCESS_BACKENDS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launcher_env(rank: int, local_rank: int, owns_group: bool) -> Iterator[None]:
    """``RANK`` / ``LOCAL_RANK`` (and, when vLLM must create its own 1-process group, ``WORLD_SIZE`` /
    ``MASTER_ADDR`` / ``MASTER_PORT``) for the external launcher, restored afterwards."""
    values = {"RANK": str(rank), "LOCAL_RANK": str(local_rank)}
    if not owns_group:
        values.update(WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def agreed_max(value: int) -> int:
    """``value``'s maximum over the trainer's ranks (a collective under a process group; ``value`` without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
