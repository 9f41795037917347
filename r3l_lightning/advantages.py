"""Group advantages (spec section 3): R³L positive amplification, its reference-code variant, baselines.

Edge cases: a group whose rewards are all equal (σ = 0) carries no contrast, so every advantage is 0
in every mode except ``none`` (for ``r3l_reference`` this overrides its "R ≥ 1 → 1.0" rule); a group of
one is the same case (its unbiased std is undefined). ``none`` returns the rewards unchanged. Ties are
exact float equality. Statistics are computed in float64; the result is float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

AdvantageMode = Literal["r3l", "r3l_reference", "grpo", "mean_baseline", "none"]
MODES: tuple[str, ...] = ("r3l", "r3l_reference", "grpo", "mean_baseline", "none")


def group_advantages(
    rewards: Sequence[float] | torch.Tensor, mode: AdvantageMode = "r3l", alpha: float = 3.0, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages of one group's rewards (1-D), float32, same length and device.

    - ``r3l`` (paper): A = (R − R̄)/(σ + eps); Â = α if R = R_max (every tie), α·A if A > 0, A otherwise.
    - ``r3l_reference`` (reference code): s = R − R̄; Â = 1 if R ≥ 1, α·s if s ≥ 0, s otherwise.
    - ``grpo`` (also "R³L w/o positive amplification"): A = (R − R̄)/(σ + eps), σ the unbiased std.
    - ``mean_baseline`` (OPMD/RLOO-style): R − R̄.
    - ``none``: R (no baseline, no normalisation, never zeroed).

    Raises ``ValueError`` for an unknown mode, a non-1-D input or a non-finite reward.
    """
    if mode not in MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; valid modes: {', '.join(MODES)}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards must be one group (1-D), got shape {tuple(r.shape)}")
    for i, value in enumerate(r.tolist()):
        if not math.isfinite(value):
            raise ValueError(f"reward {i} of the group is not finite ({value})")
    if mode == "none":
        return r.float()
    if r.numel() < 2 or bool((r == r[0]).all()):
        return torch.zeros_like(r, dtype=torch.float32)
    centred = r - r.mean()
    if mode == "mean_baseline":
        adv = centred
    elif mode == "r3l_reference":
        adv = torch.where(r >= 1.0, torch.ones_like(r), torch.where(centred >= 0, alpha * centred, centred))
    else:
        adv = centred / (r.std(unbiased=True) + eps)
        if mode == "r3l":
            adv = torch.where(r == r.max(), torch.full_like(r, alpha), torch.where(adv > 0, alpha * adv, adv))
    return adv.float()


def advantage_stats(adv: torch.Tensor) -> dict[str, float]:
    """Mean, max and min of some advantages (all 0.0 when there are none)."""
    if adv.numel() == 0:
        return {"mean": 0.0, "max": 0.0, "min": 0.0}
    adv = adv.detach().float()
    return {"mean": adv.mean().item(), "max": adv.max().item(), "min": adv.min().item()}
