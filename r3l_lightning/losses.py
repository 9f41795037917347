"""Token logprobs and the policy / SFT losses (spec section 4 and the baselines of section 5).

Losses return a :class:`LossTerms` (numerator, denominator): the batch loss is numerator/denominator,
and a caller that accumulates gradients over micro-batches sums numerators and divides by the
denominator of the whole step (see ``R3LModule``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Aggregation = Literal["seq-mean-token-mean", "token-mean"]
AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "token-mean")


@dataclass
class LossTerms:
    numerator: torch.Tensor
    denominator: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` from ``logits[:, t-1]``; ``out[:, 0] = 0``.

    The B·(L−1) rows are processed ``chunk_size`` at a time in float32 as gathered logit − logsumexp,
    so no full-vocabulary float32 log-softmax of the micro-batch is ever materialised.
    """
    batch, length, vocab = logits.shape
    rows = logits[:, :-1].reshape(-1, vocab)
    targets = input_ids[:, 1:].reshape(-1)
    logps, entropies = [], []
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size].float() / temperature
        lse = torch.logsumexp(chunk, dim=-1)
        logps.append(chunk.gather(1, targets[start : start + chunk_size, None]).squeeze(1) - lse)
        if with_entropy:
            with torch.no_grad():
                probs = torch.softmax(chunk, dim=-1)
                entropies.append(lse - (probs * chunk).sum(-1))
    zeros = logits.new_zeros((batch, 1), dtype=torch.float32)
    logp = torch.cat([zeros, torch.cat(logps).view(batch, length - 1)], dim=1) if logps else zeros.expand(batch, length)
    if not with_entropy:
        return logp, None
    ent = torch.cat([zeros, torch.cat(entropies).view(batch, length - 1)], dim=1) if entropies else zeros.expand(batch, length)
    return logp, ent


def _check(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; options: {', '.join(AGGREGATIONS)}")


def loss_denominator(loss_mask: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """Sequences with ≥ 1 trainable token (``seq-mean-token-mean``) or trainable tokens (``token-mean``)."""
    _check(aggregation)
    if aggregation == "token-mean":
        return loss_mask.sum()
    return (loss_mask.sum(dim=1) > 0).sum().to(loss_mask.dtype)


def _aggregate(per_token: torch.Tensor, loss_mask: torch.Tensor, aggregation: Aggregation) -> LossTerms:
    denominator = loss_denominator(loss_mask, aggregation)
    if aggregation == "token-mean":
        return LossTerms((per_token * loss_mask).sum(), denominator)
    lengths = loss_mask.sum(dim=1)
    per_seq = (per_token * loss_mask).sum(dim=1) / lengths.clamp(min=1e-8)
    return LossTerms(torch.where(lengths > 0, per_seq, torch.zeros_like(per_seq)).sum(), denominator)


def policy_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    aggregation: Aggregation = "seq-mean-token-mean",
    old_logprobs: torch.Tensor | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    ratio_level: Literal["token", "sequence"] = "token",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossTerms:
    """Masked policy-gradient loss.

    Default (R³L): ℓ_t = −Â·log π_t. With ``old_logprobs`` and a clip range: the clipped importance
    ratio objective, ℓ_t = −min(r·Â, clip(r, 1−clip_low, 1+clip_high)·Â) with the token ratio
    r_t = exp(log π_t − old_t), or (``ratio_level="sequence"``, GSPO) the length-normalised sequence ratio
    s = exp(mean_t(log π_t − old_t)). With ``ref_logprobs`` and ``kl_coef > 0``: + kl_coef · k3_t,
    k3 = exp(ref − log π) − (ref − log π) − 1.
    """
    _check(aggregation)
    mask = loss_mask.to(torch.float32)
    adv = advantages.to(torch.float32)[:, None]
    metrics: dict[str, torch.Tensor] = {}
    clipping = old_logprobs is not None and (clip_low is not None or clip_high is not None)
    if clipping:
        low = 1.0 - (clip_low if clip_low is not None else float("inf"))
        high = 1.0 + (clip_high if clip_high is not None else float("inf"))
        log_ratio = (logprobs - old_logprobs) * mask
        if ratio_level == "sequence":
            seq = log_ratio.sum(dim=1) / mask.sum(dim=1).clamp(min=1e-8)
            ratio = torch.exp(seq)[:, None].expand_as(logprobs)
        else:
            ratio = torch.exp(log_ratio)
        clipped = ratio.clamp(low, high)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        trainable = mask.sum().clamp(min=1.0)
        metrics["clip_fraction"] = (((ratio < low) | (ratio > high)).float() * mask).sum().detach() / trainable
        metrics["ratio_mean"] = (ratio * mask).sum().detach() / trainable
    else:
        per_token = -adv * logprobs
    if ref_logprobs is not None and kl_coef > 0:
        delta = (ref_logprobs - logprobs) * mask
        k3 = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * k3
        metrics["kl"] = (k3 * mask).sum().detach() / mask.sum().clamp(min=1.0)
    terms = _aggregate(per_token, mask, aggregation)
    terms.metrics = metrics
    return terms


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> LossTerms:
    """Mean token negative log-likelihood of the masked targets."""
    mask = loss_mask.to(torch.float32)
    return LossTerms(-(logprobs * mask).sum(), mask.sum())
