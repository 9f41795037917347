"""A fake CUDA vLLM for CPU tests of the GPU path: :class:`RecordingLLM` stands in for ``vllm.LLM`` and records
what the engine asks of it; :class:`FakeGPUVLLMEngine` is ``VLLMEngine`` believing it runs on GPUs.

``RecordingLLM`` computes the worker's ``(init method, rank, local rank)`` with vLLM's real executor code
(``ExecutorWithExternalLauncher._distributed_args`` / ``UniProcExecutor._distributed_args``), pickles every
``collective_rpc`` argument when vLLM would run its workers in other processes (the ``mp`` executor), and consumes
weight iterators (under FSDP that runs the real gathers)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import torch
import torch.distributed as dist

from r3l_lightning.engines.vllm import VLLMEngine
from r3l_lightning.engines.vllm_worker import WeightSyncExtension, unpack_bucket
from r3l_lightning.explore import ExplorationResult
from scripted import FixedExplorer


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Runner:
    """vLLM 0.32's model-runner ``reload_weights`` signature (checked by ``r3l_check_api``)."""

    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True) -> None:
        raise AssertionError("not called: RecordingLLM consumes the weights itself")


class _Worker(WeightSyncExtension):
    model_runner = _Runner()


class RecordingLLM:
    """``vllm.LLM`` on no device: records calls in ``events``; weights end up in ``loaded`` (name → tensor)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.events: list[str] = ["create"]
        self.loaded: dict[str, torch.Tensor] = {}
        backend = kwargs.get("distributed_executor_backend")
        tp = kwargs.get("tensor_parallel_size", 1)
        self.backend = backend if backend is not None else ("uni" if tp == 1 else "mp")
        from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher, UniProcExecutor

        if self.backend == "external_launcher":
            import os

            assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # vLLM asserts it
            self.distributed_args = ExecutorWithExternalLauncher._distributed_args(self)
        elif self.backend == "uni":  # vLLM's device string for CUDA has no index
            config = SimpleNamespace(device_config=SimpleNamespace(device=torch.device("cuda")))
            self.distributed_args = UniProcExecutor._distributed_args(SimpleNamespace(vllm_config=config))
        else:
            self.distributed_args = None
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))

    def _shutdown(self) -> None:
        """What vLLM 0.32's in-process ``EngineCore.shutdown`` does to the process: its real distributed cleanup."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.events.append("shutdown")
        cleanup_dist_env_and_memory()

    def collective_rpc(self, method: str, args=(), kwargs=None):
        if self.backend == "mp":
            pickle.dumps((method, args, kwargs))  # the mp executor pickles every RPC
        self.events.append(method)
        if method == "r3l_check_api":
            _Worker().r3l_check_api(*args)
        elif method == "r3l_reload_weights":
            self.loaded.update((name, tensor.detach().clone()) for name, tensor in args[0])
        elif method == "r3l_load_weight_bucket":
            self.loaded.update((name, tensor.clone()) for name, tensor in unpack_bucket(*args))
        return [None]

    def reset_prefix_cache(self) -> None:
        self.events.append("reset_prefix_cache")

    def sleep(self, level: int = 1) -> None:
        self.events.append(f"sleep:{level}")

    def wake_up(self, tags=None) -> bool:
        self.events.append(f"wake:{','.join(tags or ['all'])}")
        return True

    def generate(self, requests, sampling, use_tqdm=False, lora_request=None):
        self.events.append("generate")
        self.seeds = [s.seed for s in sampling]
        token = SimpleNamespace(logprob=-1.0)
        eos = 0
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[eos], logprobs=[{eos: token}])
                                         for _ in range(s.n)]) for s in sampling]


class FakeGPUVLLMEngine(VLLMEngine):
    """``VLLMEngine`` on a pretend GPU ``first_gpu + rank`` with :class:`RecordingLLM` as ``vllm.LLM``."""

    def __init__(self, first_gpu: int = 0, enable_sleep_mode: bool = True, **kwargs) -> None:
        super().__init__(enable_sleep_mode=enable_sleep_mode, **kwargs)
        self.first_gpu = first_gpu
        self.current_gpu: int | None = None  # what the engine last set as the current device

    _on_gpu = staticmethod(lambda: True)

    def _gpu_index(self) -> int:
        return self.first_gpu + _rank()

    def _set_gpu_index(self, index: int) -> None:
        self.current_gpu = index

    def _create(self) -> None:
        import vllm

        with mock.patch.object(vllm, "LLM", RecordingLLM):
            super()._create()


class ZeroTaskRankExplorer(FixedExplorer):
    """:class:`~scripted.FixedExplorer`, except that a rank without tasks returns nothing and never generates."""

    def explore(self, tasks, ctx):
        if not tasks:
            return ExplorationResult()
        return super().explore(tasks, ctx)


class DumpEngineEvents(L.Callback):
    """Writes the engine's recorded calls and counters to ``<dirpath>/engine_rank<r>.json`` when training ends."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module):
        engine = pl_module.rollout_engine
        record = dict(events=engine.llm.events, starts=engine.starts, syncs=engine.syncs,
                      syncs_skipped=engine.syncs_skipped, distributed_args=engine.llm.distributed_args,
                      backend=engine.llm.backend, current_gpu=engine.current_gpu)
        Path(self.dirpath, f"engine_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _rank_check(kind: str, out: str) -> None:
    """One rank of a 2-process gloo group launched the way ``kind`` ("torchrun", "lightning" or "slurm") launches
    it: create the engine on pretend GPU 4 + rank, record what vLLM's executor would do, write
    ``<out>/rank<r>.json``."""
    import os

    from r3l_lightning.models import TINY_RANDOM, eos_token_ids, load_policy, load_tokenizer

    rank = int(os.environ["SLURM_PROCID"] if kind == "slurm" else os.environ["LOCAL_RANK"])
    assert ("RANK" in os.environ) == (kind == "torchrun")  # only torchrun sets it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['R3L_TEST_PORT']}", rank=rank,
                            world_size=2)
    policy, tokenizer = load_policy(TINY_RANDOM), load_tokenizer(TINY_RANDOM)
    engine = FakeGPUVLLMEngine(first_gpu=4)
    engine.bind(policy, tokenizer, eos_token_ids(policy, tokenizer))
    engine.sync_weights()
    llm = engine.llm
    record = dict(distributed_args=llm.distributed_args, backend=llm.backend, seed=llm.kwargs["seed"],
                  current_gpu=engine.current_gpu, rank_env_after=os.environ.get("RANK"),
                  loaded=sorted(llm.loaded), state_dict=sorted(policy.state_dict()))
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    _rank_check(sys.argv[1], sys.argv[2])
