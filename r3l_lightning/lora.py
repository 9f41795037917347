"""LoRA adapters on the policy (PEFT), and the weights that leave it: merged for inference, adapter-only to save.

``model.lora: {r, alpha, dropout, target_modules}`` wraps the HF policy in a PEFT ``PeftModel`` whose only
trainable parameters are the adapters: every adapted linear layer computes

    y = W x + (alpha / r) · B A dropout(x),    A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0 at the start,

with W frozen. The optimizer, the gradients and the Lightning checkpoint hold A and B only.

Weights leave the policy in two forms, both computed from gathered full tensors (a collective under
FSDP1/FSDP2, like :func:`~r3l_lightning.models.named_full_weights`), never by merging in place (repeated
merge/unmerge would drift the frozen W in floating point):

- :func:`named_inference_weights`: HF-named weights with W' = W + (alpha / r)·B A for every adapted layer
  (what a rollout engine or a merged export needs);
- :func:`adapter_state`: the adapter tensors alone (PEFT names), saved by :func:`save_adapter` as a
  PEFT adapter directory that ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` load.

Install: ``pip install peft`` (the ``lora`` extra; 0.21.2 measured with transformers 5.19 and torch 2.13).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from r3l_lightning.models import _clean_name, named_full_weights, unwrap

_ADAPTER_MARKERS = ("lora_A.", "lora_B.")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    """``model.lora``: rank ``r``, scale ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the
    adapter input, ``target_modules`` (names of linear layers, or ``all-linear``: every linear layer but
    the output head)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r}: the rank must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the linear layers to adapt, or all-linear")


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("model.lora needs PEFT: pip install -e '.[lora]' (or pip install peft)") from err
    return peft


def add_lora(model: torch.nn.Module, config: LoRAConfig) -> torch.nn.Module:
    """``model`` wrapped in a PEFT LoRA model; only the adapter parameters require gradients."""
    peft = _peft()
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    lora_config = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                  target_modules=targets, bias="none", task_type="CAUSAL_LM")
    try:
        wrapped = peft.get_peft_model(model, lora_config)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise ValueError(f"model.lora.target_modules={config.target_modules!r}: {err}") from err
    for name, param in wrapped.named_parameters():
        param.requires_grad_(is_adapter_name(name))
    return wrapped


def has_lora(model: torch.nn.Module) -> bool:
    """True when the (possibly FSDP-wrapped) policy is a PEFT model."""
    return hasattr(unwrap(model), "peft_config")


def is_adapter_name(name: str) -> bool:
    return any(marker in name for marker in _ADAPTER_MARKERS)


def lora_rank(model: torch.nn.Module) -> int:
    """The largest adapter rank of the policy (what vLLM's ``max_lora_rank`` must allow)."""
    return max(config.r for config in unwrap(model).peft_config.values())


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model (adapters off) inside the block: the frozen reference of a LoRA policy, for free."""
    with unwrap(model).disable_adapter():
        yield


def _adapted_layers(model: torch.nn.Module) -> dict[str, float]:
    """HF name of every LoRA-adapted linear layer → its scale alpha / r (active adapter)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            if getattr(module, "fan_in_fan_out", False) or type(module.get_base_layer()) is not torch.nn.Linear:
                raise ValueError(f"LoRA on {name} ({type(module.get_base_layer()).__name__}): only nn.Linear "
                                 "layers can be merged for inference; restrict model.lora.target_modules")
            (adapter,) = module.active_adapters
            layers[_clean_name(name).removeprefix(_PEFT_PREFIX)] = float(module.scaling[adapter])
    return layers


def _lora_part(name: str) -> tuple[str, str] | None:
    """``(layer, part)`` of an adapted layer's tensor (part: weight, bias, lora_A, lora_B), else ``None``."""
    if ".base_layer." in name:
        layer, _, part = name.partition(".base_layer.")
        return layer, part
    for marker in _ADAPTER_MARKERS:
        if "." + marker in name:
            return name.split("." + marker)[0], marker.rstrip(".")
    return None


def named_inference_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights with HF names, adapters merged (W + (alpha/r)·B A); a plain policy's as they are.

    Streams one tensor at a time (one adapted layer is held until its A and B arrive). Collective under
    FSDP1/FSDP2: every rank must consume the whole iterator.
    """
    if not has_lora(model):
        yield from named_full_weights(model)
        return
    scales = _adapted_layers(model)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named_full_weights(model):
        name = _clean_name(name).removeprefix(_PEFT_PREFIX)
        found = _lora_part(name)
        if found is None:
            yield name, tensor
            continue
        layer, part = found
        if part == "bias":  # frozen, unchanged by the adapter
            yield f"{layer}.bias", tensor
            continue
        slot = pending.setdefault(layer, {})
        slot[part] = tensor
        if len(slot) == 3:
            del pending[layer]
            yield f"{layer}.weight", merged_weight(slot["weight"], slot["lora_A"], slot["lora_B"], scales[layer])
    if pending:
        raise RuntimeError(f"LoRA layers without their base weight or adapters: {sorted(pending)}")


def named_base_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The frozen base weights with HF names (adapters left out). Collective under FSDP, like the above."""
    for name, tensor in named_full_weights(model):
        name = _clean_name(name).removeprefix(_PEFT_PREFIX)
        found = _lora_part(name)
        if found is None:
            yield name, tensor
        elif found[1] in ("weight", "bias"):
            yield f"{found[0]}.{found[1]}", tensor


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale · B A, computed in float32 and returned in W's dtype."""
    delta = lora_b.float() @ lora_a.float()
    return (weight.float() + scale * delta).to(weight.dtype)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (PEFT names, full, on CPU). Collective under FSDP: every rank must call it.

    FSDP2 gathers only the adapter parameters; FSDP1 gathers one wrapped unit at a time (its flat
    parameters hold the frozen weights too).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return {name: t.cpu() for name, t in named_full_weights(model) if is_adapter_name(name)}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_adapter_name(name):
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            state[name] = tensor.detach().cpu()
    return state


def save_adapter(model: torch.nn.Module, directory: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` (from :func:`adapter_state`) as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable by ``PeftModel.from_pretrained`` and vLLM."""
    unwrap(model).save_pretrained(str(directory), state_dict=state)
    return Path(directory)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under the adapters (its ``save_pretrained`` writes a merged export given merged weights)."""
    inner = unwrap(model)
    return inner.get_base_model() if has_lora(model) else inner
