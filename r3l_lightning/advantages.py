"""Group advantages (spec section 3): R³L positive amplification, its reference-code variant, baselines.

Edge cases: a group whose rewards are all equal (σ = 0) carries no contrast, so every advantage is 0
for every mode except ``none`` (for ``r3l_reference`` this overrides its "R ≥ 1 → 1.0" rule); a group of
one is the same case (its unbiased std is undefined); ``none`` returns the rewards unchanged.
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
    """Advantages of one group's rewards.

    - ``grpo``: A = (R − R̄)/(σ + eps), σ the unbiased std ("R³L w/o positive amplification").
    - ``r3l`` (paper): Â = α if R = R_max (all ties), α·A if A > 0, A otherwise.
    - ``r3l_reference``: s = R − R̄; Â = 1 if R ≥ 1, α·s if s ≥ 0, s otherwise.
    - ``mean_baseline`` (OPMD/RLOO-style): R − R̄.
    - ``none``: R.
    """
    if mode not in MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; valid modes: {', '.join(MODES)}")
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    for i, value in enumerate(r.tolist()):
        if not math.isfinite(value):
            raise ValueError(f"reward {i} of the group is not finite ({value})")
    if mode == "none":
        return r.clone()
    if r.numel() < 2 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    centred = r - r.mean()
    if mode == "mean_baseline":
        return centred
    if mode == "r3l_reference":
        return torch.where(r >= 1.0, torch.ones_like(r), torch.where(centred >= 0, alpha * centred, centred))
    normalised = centred / (r.std(unbiased=True) + eps)
    if mode == "grpo":
        return normalised
    amplified = torch.where(normalised > 0, alpha * normalised, normalised)
    return torch.where(r == r.max(), torch.full_like(r, alpha), amplified)
