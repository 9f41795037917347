"""Group advantages: R³L positive amplification (paper §4.3 Positive Amplification, Eq. 11), its
reference-code variant, and the baselines (GRPO's Eq. 4 in §3.2).

Edge cases, per mode (a group of one has no unbiased std; "all equal" means σ = 0):

- ``r3l`` (paper): all equal or one sample → every advantage 0 (no contrast, no RL signal).
- ``r3l_reference``: exactly the reference code's ``OPMDReweightAdvGroupAdvantage``: its rule applies to
  equal groups too (an all-success group gets 1.0 each, an all-zero one 0), and a group of one uses
  baseline 0 (R = 1 → 1.0, R = 0.6 → 3·0.6 = 1.8).
- ``grpo``, ``mean_baseline``: all equal → 0; a group of one → 0 (``singleton="no_signal"``) or, as the
  reference code's GRPO/OPMD (``singleton="zero_baseline"``), baseline 0 and σ = 1: R/(1 + eps), resp. R.
- ``none``: the rewards unchanged, never zeroed.

Ties are exact float equality. Statistics are computed in float64; the result is float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

AdvantageMode = Literal["r3l", "r3l_reference", "grpo", "mean_baseline", "none"]
MODES: tuple[str, ...] = ("r3l", "r3l_reference", "grpo", "mean_baseline", "none")
SingletonRule = Literal["no_signal", "zero_baseline"]
SINGLETON_RULES: tuple[str, ...] = ("no_signal", "zero_baseline")


def group_advantages(
    rewards: Sequence[float] | torch.Tensor,
    mode: AdvantageMode = "r3l",
    alpha: float = 3.0,
    eps: float = 1e-6,
    singleton: SingletonRule = "no_signal",
) -> torch.Tensor:
    """Advantages of one group's rewards (1-D), float32, same length.

    - ``r3l`` (paper): A = (R − R̄)/(σ + eps); Â = α if R = R_max (every tie), α·A if A > 0, A otherwise.
    - ``r3l_reference`` (reference code): b = R̄ (b = 0 for one sample), s = R − b;
      Â = 1 if R ≥ 1, α·s if s ≥ 0, s otherwise.
    - ``grpo`` (also "R³L w/o positive amplification"): A = (R − R̄)/(σ + eps), σ the unbiased std.
    - ``mean_baseline`` (OPMD/RLOO-style): R − R̄.
    - ``none``: R (no baseline, no normalisation, never zeroed).

    ``singleton`` only concerns ``grpo`` and ``mean_baseline`` (see the module docstring).
    Raises ``ValueError`` for an unknown mode or singleton rule, a non-1-D input or a non-finite reward.
    """
    if mode not in MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; valid modes: {', '.join(MODES)}")
    if singleton not in SINGLETON_RULES:
        raise ValueError(f"unknown singleton rule {singleton!r}; valid rules: {', '.join(SINGLETON_RULES)}")
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards must be one group (1-D), got shape {tuple(r.shape)}")
    for i, value in enumerate(r.tolist()):
        if not math.isfinite(value):
            raise ValueError(f"reward {i} of the group is not finite ({value})")
    if mode == "none" or r.numel() == 0:
        return r.float()
    if mode == "r3l_reference":
        s = r - (r.mean() if r.numel() > 1 else 0.0)
        # equivalent mutant (docs/mutation.md): s > 0 gives the same, as alpha * 0 = 0 = s
        return torch.where(r >= 1.0, torch.ones_like(r), torch.where(s >= 0, alpha * s, s)).float()
    if r.numel() == 1 and singleton == "zero_baseline" and mode in ("grpo", "mean_baseline"):
        return (r / (1.0 + eps) if mode == "grpo" else r).float()
    if r.numel() < 2 or bool((r == r[0]).all()):  # equivalent mutant: r[1] for r[0]
        return torch.zeros_like(r, dtype=torch.float32)
    centred = r - r.mean()
    if mode == "mean_baseline":
        return centred.float()
    adv = centred / (r.std(unbiased=True) + eps)
    if mode == "r3l":
        # equivalent mutant (docs/mutation.md): adv >= 0 gives the same, as alpha * 0 = 0 = adv
        adv = torch.where(r == r.max(), torch.full_like(r, alpha), torch.where(adv > 0, alpha * adv, adv))
    return adv.float()


def advantage_stats(adv: torch.Tensor) -> dict[str, float]:
    """Mean, max and min of some advantages (all 0.0 when there are none)."""
    if adv.numel() == 0:
        return {"mean": 0.0, "max": 0.0, "min": 0.0}
    adv = adv.detach().float()
    return {"mean": adv.mean().item(), "max": adv.max().item(), "min": adv.min().item()}
