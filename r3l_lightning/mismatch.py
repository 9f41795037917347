"""The gap between the rollout engine's log-probabilities and the trainer's: metrics and optional correction.

The engine (vLLM in bf16 with its own kernels, or HF ``generate``) reports log π_rollout(y_t) for every
sampled token; the trainer recomputes log π_train(y_t) on the same tokens. With

    Δ_t = log π_train(y_t) − log π_rollout(y_t),    r_t = exp(Δ_t) = π_train(y_t) / π_rollout(y_t),

:class:`MismatchTotals` accumulates, per sample kind and over trainable tokens (loss mask ≠ 0) of rows
that carry rollout logprobs:

- ``abs_diff_mean`` = mean |Δ_t|;
- ``k3_kl`` = mean (r_t − 1 − log r_t), the k3 estimate of KL(π_rollout ‖ π_train) from tokens
  sampled by the engine (≥ 0 per token, 0 iff r_t = 1);
- ``out_of_range_fraction`` = fraction of tokens with r_t ∉ [0.5, 2];
- ``ratio_max`` = max r_t.

A distill sample's rollout logprobs were produced with the reflection's guidance in the prompt, and
the trainer scores the same tokens without it; a reflection (``sft_reflect``) was sampled at the
reflection temperature while the trainer scores at temperature 1. Their "mismatch" is therefore large by
construction: it measures the change of context, not numerical error.

:func:`correction_weights` is the optional truncated / masked importance-sampling correction
(``model.rollout_correction``), applied to the rows of the kinds marked ``rollout_corrected`` in
:data:`r3l_lightning.trajectory.SAMPLE_KINDS` (``base`` only):

- ``tis``: w_t = min(r_t, cap), no gradient through w;
- ``mis``: w_t = 1 if 1/cap ≤ r_t ≤ cap else 0;

each trainable token's policy-gradient loss is multiplied by w_t; the loss denominators (|τ|, |G|)
stay those of the uncorrected loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from r3l_lightning import trajectory

SAMPLE_KINDS: tuple[str, ...] = tuple(trajectory.SAMPLE_KINDS)  # the order of the micro-batch ``kind`` column
RATIO_RANGE = (0.5, 2.0)
STATS = ("abs_diff_mean", "k3_kl", "out_of_range_fraction", "ratio_max", "tokens")
_SUM_COLUMNS = 4  # tokens, Σ|Δ|, Σ k3, Σ out-of-range; the max ratio is kept separately
CorrectionMode = Literal["none", "tis", "mis"]


@dataclass(frozen=True)
class RolloutCorrection:
    """``model.rollout_correction``: ``mode`` none (the paper: no correction), tis or mis; ``cap`` ≥ 1."""

    mode: CorrectionMode = "none"
    cap: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in get_args(CorrectionMode):
            raise ValueError(f"model.rollout_correction.mode={self.mode!r}: use none, tis or mis")
        if not self.cap >= 1.0:
            raise ValueError(f"model.rollout_correction.cap={self.cap}: must be >= 1 (tis caps r at it, "
                             "mis keeps tokens with 1/cap <= r <= cap)")


def rollout_corrected(kind_column: torch.Tensor) -> torch.Tensor:
    """Which rows of a micro-batch ``kind`` column are of a kind that ``model.rollout_correction`` weights (bool [B])."""
    flags = torch.tensor([info.rollout_corrected for info in trajectory.SAMPLE_KINDS.values()], device=kind_column.device)
    return flags[kind_column]


def kind_indices(kinds: list[str]) -> torch.Tensor:
    """Positions of ``kinds`` in :data:`SAMPLE_KINDS` (the ``kind`` column of a micro-batch)."""
    unknown = sorted(set(kinds) - set(SAMPLE_KINDS))
    if unknown:
        raise ValueError(f"unknown sample kind(s) {unknown}; known: {', '.join(SAMPLE_KINDS)}")
    return torch.tensor([SAMPLE_KINDS.index(k) for k in kinds], dtype=torch.long)


class MismatchTotals:
    """Per-kind sums of one optimizer step's mismatch statistics (add micro-batches, then reduce, then read)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(len(SAMPLE_KINDS), _SUM_COLUMNS, dtype=torch.float64, device=device)
        self.ratio_max = torch.full((len(SAMPLE_KINDS),), -float("inf"), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor,
            kinds: torch.Tensor, has_rollout_logprobs: torch.Tensor) -> None:
        """Accumulate a [B, L] micro-batch: trainer and rollout logprobs, loss mask, kind index and
        has-rollout-logprobs flag per row."""
        tokens = (loss_mask != 0) & has_rollout_logprobs[:, None]
        delta = torch.where(tokens, logprobs.double() - rollout_logprobs.double(), 0.0)
        ratio = torch.exp(delta)
        low, high = RATIO_RANGE
        # off-token positions have Δ = 0, r = 1: they add 0 to every sum
        per_token = torch.stack([tokens.double(), delta.abs(), ratio - 1.0 - delta,
                                 ((ratio < low) | (ratio > high)).double()], dim=-1)
        self.sums.index_add_(0, kinds, per_token.sum(dim=1))
        row_max = torch.where(tokens, ratio, -float("inf")).amax(dim=1)
        self.ratio_max.scatter_reduce_(0, kinds, row_max, reduce="amax")

    def all_reduce(self) -> None:
        """Sum the counts and take the max ratio over all ranks (every rank must call it)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.sums, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(self.ratio_max, op=torch.distributed.ReduceOp.MAX)

    def metrics(self, prefix: str = "mismatch") -> dict[str, float]:
        """``{prefix}/{kind}/{stat}`` for every kind with at least one token (:data:`STATS`)."""
        out: dict[str, float] = {}
        for i, kind in enumerate(SAMPLE_KINDS):
            count, abs_sum, k3_sum, outside = self.sums[i].tolist()
            if count == 0:
                continue
            values = (abs_sum / count, k3_sum / count, outside / count, float(self.ratio_max[i]), count)
            out.update({f"{prefix}/{kind}/{stat}": v for stat, v in zip(STATS, values)})
        return out


def correction_weights(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    corrected: torch.Tensor,
    correction: RolloutCorrection,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token loss weights [B, L] and where the cap acted, or ``None`` for mode none (no gradient).

    Rows flagged by ``corrected`` (bool [B]: rows of a ``rollout_corrected`` kind with rollout logprobs) get the tis/mis weight of
    their token ratio r = exp(logprobs − rollout_logprobs); every other row gets weight 1.
    ``capped`` (bool [B, L]) marks the corrected tokens the cap changed: tis r > cap, mis r ∉ [1/cap, cap].
    """
    if correction.mode == "none":
        return None
    with torch.no_grad():
        rows = corrected.bool()[:, None]
        ratio = torch.exp(torch.where(rows, logprobs.detach().float() - rollout_logprobs.float(), 0.0))
        cap = correction.cap
        if correction.mode == "tis":
            capped = ratio > cap
            weight = ratio.clamp(max=cap)
        else:
            capped = (ratio < 1.0 / cap) | (ratio > cap)
            weight = (~capped).float()
        return torch.where(rows, weight, 1.0), capped & rows
