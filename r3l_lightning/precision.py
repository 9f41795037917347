"""``precision: auto`` and ``model_dtype: auto``: the fastest training precision this machine runs natively.

- CPUs with native bf16 instructions (AMX or AVX512-BF16) and CUDA GPUs with native bf16 (compute capability
  ≥ 8.0, Ampere and later): ``bf16-mixed``, bf16 matmuls under autocast with fp32 master weights
  (``benchmarks/train_step.py`` measured it 2-3x faster than fp32 on such CPUs, and faster than bf16 weights).
- Everywhere else (AVX2-only CPUs, where bf16 is emulated and slower than fp32; older GPUs; MPS): ``32-true``.

``model_dtype: auto`` is ``float32`` under every precision but ``bf16-true``: under ``bf16-mixed`` the weights
stay fp32 master weights, since a bf16 weight does not move under an update smaller than half its rounding step
(AdamW's first steps move each weight by about ``lr``: at the main job's lr 5e-5 that leaves most bf16 weights
unchanged; ``train_step.py`` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
CPUINFO = Path("/proc/cpuinfo")
# CPU flags (as /proc/cpuinfo spells them) of native bf16 matmul instructions, with their usual names
NATIVE_BF16_CPU_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
_CUDA_NATIVE_BF16 = (8, 0)  # Ampere: the first CUDA capability with bf16 tensor cores


def cpu_flags() -> set[str]:
    """This CPU's feature flags: the ``flags`` lines of Linux's ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}


def cpu_native_bf16_features() -> list[str]:
    """Names of this CPU's native bf16 instruction sets (``["AMX", "AVX512-BF16"]``, or ``[]``)."""
    flags = cpu_flags()
    return [name for flag, name in NATIVE_BF16_CPU_FLAGS.items() if flag in flags]


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX); AVX2-only CPUs emulate bf16 (slower than fp32)."""
    return bool(cpu_native_bf16_features())


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of CUDA device 0, or ``None`` without CUDA."""
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``auto`` resolves to on this machine, and why (one line for the start-up log)."""

    precision: str
    reason: str


def auto_precision(accelerator: object = "auto") -> PrecisionChoice:
    """``bf16-mixed`` where the trainer's device runs bf16 natively, else ``32-true``.

    ``accelerator`` is the Trainer's (``auto``, ``cpu``, ``gpu``/``cuda``, ``mps``, ... or an ``Accelerator``):
    ``auto`` means CUDA when it is available, else the CPU (Lightning's choice on machines without MPS).
    """
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower().replace("accelerator", "")
    capability = cuda_capability()
    if name in ("gpu", "cuda") or (name == AUTO and capability is not None):
        if capability is None:
            return PrecisionChoice("32-true", f"accelerator {name} without a CUDA device")
        device = f"CUDA capability {capability[0]}.{capability[1]}"
        if capability >= _CUDA_NATIVE_BF16:
            return PrecisionChoice("bf16-mixed", f"{device} has native bf16")
        return PrecisionChoice("32-true", f"{device} has no native bf16 (needs ≥ 8.0)")
    if name not in ("cpu", AUTO):
        return PrecisionChoice("32-true", f"accelerator {name}: bf16 not measured there")
    features = cpu_native_bf16_features()
    if features:
        return PrecisionChoice("bf16-mixed", f"this CPU has native bf16: {', '.join(features)}")
    return PrecisionChoice("32-true", "this CPU has no native bf16 (no AMX or AVX512-BF16): emulated bf16 "
                                      "is slower than fp32")


def resolve_precision(precision: object, accelerator: object = "auto") -> tuple[object, str | None]:
    """``(precision, reason)``: ``auto`` resolved by :func:`auto_precision`; any other value as given, no reason."""
    if precision != AUTO:
        return precision, None
    choice = auto_precision(accelerator)
    return choice.precision, choice.reason


def resolve_model_dtype(model_dtype: str, precision: object = AUTO) -> str:
    """``model_dtype: auto``: ``bfloat16`` under ``bf16-true`` (Lightning casts the weights to it anyway), else
    ``float32`` (fp32 training, or fp32 master weights under ``bf16-mixed``); other values as given."""
    if model_dtype != AUTO:
        return model_dtype
    return "bfloat16" if precision == "bf16-true" else "float32"


def resolve_auto(precision: object, model_dtype: str, accelerator: object = "auto") -> tuple[object, str, str | None]:
    """``(precision, model_dtype, line)``: both resolved (``model_dtype`` after the precision it serves), and the
    start-up line saying what ``auto`` chose and why (``None`` when neither was ``auto``)."""
    resolved, reason = resolve_precision(precision, accelerator)
    dtype = resolve_model_dtype(model_dtype, resolved)
    chosen = [f"{name}: auto -> {value}" for name, given, value in
              (("precision", precision, resolved), ("model_dtype", model_dtype, dtype)) if given == AUTO]
    if not chosen:
        return resolved, dtype, None
    why = reason or f"trainer.precision {resolved}"
    return resolved, dtype, ", ".join(chosen) + f" ({why})"
