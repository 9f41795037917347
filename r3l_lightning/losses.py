"""Token logprobs, the policy / SFT losses and KL estimators (the R³L objective, paper §4.3 Eq. 12; the
baselines of §5.1 Experimental Setup, GRPO's clipped ratio and KL as in §3.2 Eqs. 5-6).

Losses return a :class:`LossTerms` (numerator, denominator): the batch loss is numerator/denominator,
and a caller that accumulates gradients over micro-batches sums the numerators and divides by the
step's denominator, the sum of :func:`loss_denominator` over its micro-batches (see ``R3LModule``).

``loss_mask`` is aligned with ``input_ids`` (mask[t] = 1 iff token t is a target) and may carry
weights: |τ| and every "mean over trainable tokens" below is weighted by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

Aggregation = Literal["seq-mean-token-mean", "token-mean", "token-mean-per-micro-batch"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KLEstimator = Literal["k3", "k2"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
RatioLevel = Literal["token", "sequence"]
OldLogprobs = Literal["trainer", "rollout"]


def _one_of(name: str, value: object, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"model.loss.{name}={value!r}: use one of {', '.join(options)}")


def _at_least(name: str, value: float | None, bound: float, strict: bool = False) -> None:
    """``value`` (``None``: not set, nothing to check) is ≥ ``bound`` (> when ``strict``)."""
    if value is not None and not (value > bound if strict else value >= bound):
        raise ValueError(f"model.loss.{name} must be {'>' if strict else '>='} {bound:g}, got {value:g}")


@dataclass(frozen=True)
class LossConfig:
    """``model.loss``: the loss L = L_RL + sft_coef · L_SFT (paper §4.3, Eq. 12) and the baselines' terms of L_RL.

    The default is the paper's R³L: REINFORCE with the explorer's advantages, no ratio, no clip, no KL.
    Every value and combination is checked once, here; :func:`policy_loss` reads the policy-term fields.

    Attributes:
        aggregation: how per-token losses make the step loss: ``seq-mean-token-mean`` (Eq. 12:
            (1/|G|) Σ_τ (1/|τ|) Σ_t), ``token-mean`` (one mean over the step's tokens) or
            ``token-mean-per-micro-batch`` (the reference code's verl; :func:`micro_batch_denominator`).
        sft_coef: λ_sft ≥ 0, the weight of the SFT loss on the explorer's SFT samples (D_reflect ∪ D_retry).
        clip_low: ε_low ≥ 0 of the clipped importance ratio, clip(r, 1 − ε_low, 1 + ε_high) (GRPO/PPO);
            ``None``: no lower bound. Setting ``clip_low`` or ``clip_high`` turns the ratio on.
        clip_high: ε_high ≥ 0 (DAPO's clip-higher sets it above ε_low); ``None``: no upper bound.
        ratio_level: ``token`` (r_t per token) or ``sequence`` (GSPO: one length-normalised ratio per
            sequence); needs a clip range.
        old_logprobs: the ratio's old policy π_old; needs a clip range. ``trainer`` (verl's ``old_log_prob``): the
            policy's own logprobs of the epoch's samples before its first update (the first step's are its own
            training forward, detached; the later steps' are computed once after exploration: one extra forward
            per micro-batch after the first step, none when an epoch is one step), so the ratio is exactly 1 on
            the first update and only the epoch's own updates move it; the engine's sampling temperature and
            decoding constraints (processed logprobs, renormalised over the allowed tokens: always ≥ the
            policy's) never enter it. ``rollout``: the engine's logprobs as sampled (no extra forward pass;
            biased under a decoding constraint or a temperature ≠ 1).
        kl_coef: β ≥ 0 of the KL term β·KL(π_θ ‖ π_ref) to a frozen reference model, loaded only when β > 0.
        kl_estimator: ``k3`` (e^δ − δ − 1, unbiased) or ``k2`` (½δ², the reference code's), δ = log π_ref − log π_θ.
        shaping_gamma: γ > 0 of Critique-GRPO's policy shaping f(π) = π/(π + γ) on refinement samples;
            ``None``: off, refinements train like any other sample.
        opmd_tau: OPMD's τ ≥ 0: the policy-gradient term is divided by 1 + τ (the KL term is not).
        logit_temperature: T > 0: the trainer's logprobs (policy, old policy, reference) are those of
            logits / T (the reference code's verl divides by the rollout temperature: set it to the explorer's
            ``temperature``); 1.0: the model's own distribution.
    """

    aggregation: Aggregation = "seq-mean-token-mean"
    sft_coef: float = 1.0
    clip_low: float | None = None
    clip_high: float | None = None
    ratio_level: RatioLevel = "token"
    old_logprobs: OldLogprobs = "trainer"
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    shaping_gamma: float | None = None
    opmd_tau: float = 0.0
    logit_temperature: float = 1.0

    def __post_init__(self) -> None:
        _one_of("aggregation", self.aggregation, AGGREGATIONS)
        _one_of("ratio_level", self.ratio_level, get_args(RatioLevel))
        _one_of("old_logprobs", self.old_logprobs, get_args(OldLogprobs))
        _one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        for name in ("sft_coef", "clip_low", "clip_high", "kl_coef", "opmd_tau"):
            _at_least(name, getattr(self, name), 0.0)
        _at_least("shaping_gamma", self.shaping_gamma, 0.0, strict=True)
        _at_least("logit_temperature", self.logit_temperature, 0.0, strict=True)
        if not self.uses_ratio:
            for name, default in (("ratio_level", "token"), ("old_logprobs", "trainer")):
                if getattr(self, name) != default:
                    raise ValueError(f"model.loss.{name}={getattr(self, name)} has no effect without a clip range: "
                                     "set model.loss.clip_low and/or model.loss.clip_high")

    @property
    def uses_ratio(self) -> bool:
        """Whether L_RL uses the clipped importance ratio (``clip_low`` and/or ``clip_high`` set)."""
        return self.clip_low is not None or self.clip_high is not None


@dataclass
class LossTerms:
    """A loss as ``numerator / denominator``; ``metrics`` are detached scalars."""

    numerator: torch.Tensor
    denominator: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _chunk_logprobs(x: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """log-sum-exp, target logprob and (when asked) entropy of each row of scaled logits ``x``."""
    # equivalent mutants (docs/mutation.md): dim=+1 and sum(+1) for -1 (x is [rows, vocab]); an entropy computed
    # though not asked for (the caller stores it only when asked)
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = lse - (torch.softmax(x, dim=-1) * x).sum(-1) if with_entropy else None
    return lse, logp, entropy


def _chunked_logprobs(scaled_logits, targets: torch.Tensor, chunk_size: int, with_entropy: bool,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logprobs, log-sum-exps and entropies (empty unless ``with_entropy``) of ``len(targets)`` rows whose
    scaled logits ``scaled_logits(start, end)`` gives ``chunk_size`` rows at a time."""
    # equivalent mutants: an entropy buffer of n or 1 entries though not asked for (never returned); a step of 1 or
    # end = None (overlapping chunks write the same values again: only time and memory differ)
    n = targets.shape[0]
    logp = targets.new_empty(n, dtype=dtype)
    lse = targets.new_empty(n, dtype=dtype)
    entropy = targets.new_empty(n if with_entropy else 0, dtype=dtype)
    for start in range(0, n, chunk_size):
        end = start + chunk_size
        lse[start:end], logp[start:end], h = _chunk_logprobs(scaled_logits(start, end), targets[start:end],
                                                             with_entropy)
        if with_entropy:
            entropy[start:end] = h
    return logp, lse, entropy


def _chunk_logit_grad(x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """∂(Σ g·logp)/∂logits for rows of scaled logits ``x``: g·(1[j = y] − p_j) / T (overwrites ``x``)."""
    g = grad_logp[:, None]
    d = torch.exp_(x.sub_(lse[:, None])).mul_(-g)
    d.scatter_add_(1, targets[:, None], g)
    return d.div_(temperature)


class _ChunkedLogProb(torch.autograd.Function):
    """log softmax(rows / T)[target] per row, ``chunk_size`` rows at a time, in (at least) float32.

    Only per-row log-sum-exps are kept for the backward pass, which recomputes the softmax chunk by
    chunk: neither pass holds a float32 copy of more than one chunk of the vocabulary-sized rows.
    """

    @staticmethod
    def forward(ctx, rows, targets, temperature, chunk_size, with_entropy):
        dtype = torch.promote_types(rows.dtype, torch.float32)
        logp, lse, entropy = _chunked_logprobs(lambda start, end: rows[start:end].to(dtype) / temperature, targets,
                                               chunk_size, with_entropy, dtype)
        ctx.save_for_backward(rows, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        rows, targets, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        grad_rows = torch.empty_like(rows)
        # equivalent mutants: a step of 1 or end = None (overlapping chunks write the same gradients again)
        for start in range(0, rows.shape[0], chunk_size):
            end = start + chunk_size
            x = rows[start:end].to(lse.dtype) / temperature
            grad_rows[start:end] = _chunk_logit_grad(x, lse[start:end], targets[start:end], grad_logp[start:end],
                                                     temperature)
        return grad_rows, None, None, None, None


class _ChunkedHeadLogProb(torch.autograd.Function):
    """log softmax(hidden · Wᵀ / T)[target] per row, the vocabulary projection done ``chunk_size`` rows at a time.

    The logits of a chunk exist only while that chunk is processed, in the forward pass and again in the
    backward pass (which recomputes them: 2·H·V more FLOPs per row than keeping them, no [rows, vocab] tensor
    kept). Logits are computed in ``compute_dtype`` and soft-maxed in (at least) float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, compute_dtype):
        dtype = torch.promote_types(compute_dtype, torch.float32)
        w = weight.to(compute_dtype)
        logp, lse, entropy = _chunked_logprobs(
            lambda start, end: (hidden[start:end].to(compute_dtype) @ w.T).to(dtype) / temperature, targets,
            chunk_size, with_entropy, dtype)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.compute_dtype = temperature, chunk_size, compute_dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, chunk_size, compute_dtype = ctx.temperature, ctx.chunk_size, ctx.compute_dtype
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            h = hidden[start:end].to(compute_dtype)
            x = (h @ w.T).to(lse.dtype) / temperature
            d = _chunk_logit_grad(x, lse[start:end], targets[start:end], grad_logp[start:end], temperature)
            d = d.to(compute_dtype)
            grad_hidden[start:end] = d @ w
            # equivalent mutant: .to(None), as += casts the compute-dtype product to grad_weight's dtype exactly
            grad_weight += (d.T @ h).to(grad_weight.dtype)
        # equivalent mutant: .to(None), as autograd casts a gradient to its input's dtype
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,  # equivalent mutant (docs/mutation.md): any size gives the same values, it bounds memory
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`` from ``logits[:, t-1] / temperature``.

    ``out[:, 0] = 0``. Rows are processed ``chunk_size`` at a time as gathered logit − logsumexp in
    float32 (float64 for float64 logits), so no full-vocabulary float32 log-softmax of the batch is
    ever materialised, in the forward or the backward pass. The entropy of the same distributions
    (same alignment, position 0 = 0, no gradient) is returned when ``with_entropy``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs needs logits [B, L, V] and input_ids [B, L] of the same B, L; got logits "
            f"{list(logits.shape)} and input_ids {list(input_ids.shape)}"
        )
    batch, length, vocab = logits.shape
    # Row (b, t) of the flat view predicts input_ids[b, t + 1]; the last position of each row has no
    # target (dummy 0, its output is dropped and gets no gradient).
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1).reshape(-1)
    logp, entropy = _ChunkedLogProb.apply(logits.reshape(-1, vocab), targets, temperature, chunk_size, with_entropy)

    def shifted(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.new_zeros(batch, 1), values.view(batch, length)[:, :-1]], dim=1)

    return shifted(logp), shifted(entropy) if with_entropy else None


def head_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,  # equivalent mutant (docs/mutation.md): any size gives the same values, it bounds memory
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logprobs` from the last hidden states ``hidden`` [B, L, H] and the output projection
    ``weight`` [V, H], computed only where ``targets`` [B, L] (bool) is set; 0 elsewhere.

    ``out[:, t] = log softmax(hidden[:, t-1] · Wᵀ / T)[input_ids[:, t]]`` for ``targets[:, t]``. The selected
    rows are projected onto the vocabulary ``chunk_size`` at a time (:class:`_ChunkedHeadLogProb`), so neither
    a [B, L, V] logits tensor nor the projection of untrained positions (prompts, observations, padding) is
    ever computed.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2] or targets.shape != input_ids.shape:
        raise ValueError(
            f"head_token_logprobs needs hidden [B, L, H], input_ids and targets [B, L] of the same B, L; got "
            f"{list(hidden.shape)}, {list(input_ids.shape)} and {list(targets.shape)}"
        )
    selected = targets.clone()
    selected[:, 0] = False  # token 0 has no prediction
    rows, cols = selected.nonzero(as_tuple=True)
    compute_dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                     else hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = _ChunkedHeadLogProb.apply(hidden[rows, cols - 1], weight, input_ids[rows, cols], temperature,
                                                  chunk_size, with_entropy, compute_dtype)

    def placed(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(input_ids.shape).index_put((rows, cols), values)

    return placed(logp), placed(entropy) if with_entropy else None


def _check(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; options: {', '.join(AGGREGATIONS)}")


def _check_batch(loss_mask: torch.Tensor, **per_token: torch.Tensor | None) -> None:
    """``loss_mask`` is [B, L] and every given per-token tensor has exactly its shape (no broadcasting)."""
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, L] (one row per sequence), got shape {list(loss_mask.shape)}")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != loss_mask.shape:
            raise ValueError(f"{name} must have the shape of loss_mask {list(loss_mask.shape)}, got {list(tensor.shape)}")


def _per_token_advantages(advantages: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[B] (one per sequence) → [B, 1]; [B, L] (one per token) as is; any other shape is an error."""
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.float()[:, None]
    if advantages.shape == shape:
        return advantages.float()
    raise ValueError(
        f"advantages must be one per sequence [B] = [{shape[0]}] or one per token [B, L] = {list(shape)}, "
        f"got {list(advantages.shape)}"
    )


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the sampled tokens' logprobs (the reference code's ``kl_fn.py``).

    With δ = log π_ref − log π_θ: ``k3`` = e^δ − δ − 1 (unbiased, ≥ 0); ``k2`` = ½·δ² (the reference code's
    default for R³L and OPMD).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; options: {', '.join(KL_ESTIMATORS)}")
    delta = ref_logprobs - logprobs
    if estimator == "k2":
        return 0.5 * delta.square()
    return torch.exp(delta) - delta - 1.0


def loss_denominator(loss_mask: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """Σ mask (``token-mean``), or the sequences with ≥ 1 trainable token (``seq-mean-token-mean``, and
    ``token-mean-per-micro-batch``, whose step denominator counts sequences: :func:`micro_batch_denominator`), float."""
    _check(aggregation)
    _check_batch(loss_mask)
    mask = loss_mask.float()
    if aggregation == "token-mean":
        return mask.sum()
    return (mask.sum(dim=1) > 0).sum().float()


def micro_batch_denominator(loss_mask: torch.Tensor, aggregation: Aggregation,
                            step_denominator: torch.Tensor) -> torch.Tensor:
    """What one micro-batch's loss numerator is divided by, given the step's :func:`loss_denominator` (summed
    over the step's micro-batches). ``seq-mean-token-mean``, ``token-mean``: the step's, so that the step loss
    is one mean over the step. ``token-mean-per-micro-batch`` (verl's dynamic batch size, as the reference code
    trains): the micro-batch's own token-mean, weighted by its share of the step's sequences, i.e.
    Σ mask · S / s for S sequences in the step and s in this micro-batch."""
    if aggregation != "token-mean-per-micro-batch":
        return step_denominator
    sequences = loss_denominator(loss_mask, aggregation).clamp(min=1.0)  # none: the numerator is 0 as well
    return (loss_mask.float().sum() * step_denominator / sequences).clamp(min=1e-8)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean of ``values`` over the trainable tokens (0 when there are none)."""
    return (torch.where(mask != 0, values * mask, 0.0).sum() / mask.sum().clamp(min=1e-8)).detach()


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation) -> LossTerms:
    weighted = torch.where(mask != 0, per_token * mask, 0.0)  # padding never leaks (not even as NaN)
    if aggregation in ("token-mean", "token-mean-per-micro-batch"):
        numerator = weighted.sum()
    else:
        lengths = mask.sum(dim=1)  # equivalent mutant: lengths >= 0, as a row with |τ| = 0 sums to 0 / 1e-8 = 0
        numerator = torch.where(lengths > 0, weighted.sum(dim=1) / lengths.clamp(min=1e-8), 0.0).sum()
    return LossTerms(numerator, loss_denominator(mask, aggregation))


def policy_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    config: LossConfig = LossConfig(),
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    shaped: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossTerms:
    """Masked policy-gradient loss of a [B, L] batch, with the terms ``config`` (a :class:`LossConfig`, checked
    when it was made) turns on.

    ``advantages`` is one per sequence ([B], broadcast over its tokens) or one per token ([B, L], the
    layout of verl / Trinity-RFT / TRL); any other shape, and any per-token input whose shape differs
    from ``loss_mask``'s, raises ``ValueError``. Per-token loss ℓ_t:

    - default (R³L): ℓ_t = −Â·log π_t (no ratio, no clip, no KL);
    - with ``old_logprobs`` and ``clip_low`` and/or ``clip_high`` (a missing side is unbounded):
      ℓ_t = −min(r·Â, clip(r, 1 − clip_low, 1 + clip_high)·Â) with the token ratio
      r_t = exp(log π_t − old_t), or for ``ratio_level="sequence"`` (GSPO) the sequence ratio
      s = exp(mean over its trainable tokens of (log π − old)) for every token of the sequence;
      ``old_logprobs`` without a clip range is ignored;
    - policy shaping (Critique-GRPO) on the rows flagged by ``shaped`` (bool [B]) when ``shaping_gamma``
      (γ > 0) is set: ℓ_t = −Â·f(π_t), f(π) = π/(π + γ), π_t = exp(log π_t), in place of the rows'
      ratio/REINFORCE term (no ratio, no clip: their rollout logprobs came from another context);
      gradient −Â·γ·π/(π + γ)² per log π_t. ``shaping_gamma=None`` (default): those rows train as any other;
    - with ``token_weights`` ([B, L], no gradient; the rollout correction of
      :func:`~r3l_lightning.mismatch.correction_weights`): the policy-gradient term above becomes w_t·ℓ_t
      (the KL term is not weighted; |τ| and the denominator stay unweighted);
    - OPMD's ``opmd_tau`` τ: the policy term above is divided by (1 + τ) (the reference code's
      ``opmd_policy_loss.py`` divides its token-mean loss by 1 + τ; the KL term is not divided);
    - with ``ref_logprobs`` and ``kl_coef > 0``: + kl_coef·kl_t, kl_t = :func:`kl_estimate` with
      ``kl_estimator`` (on every row, shaped or not).

    Aggregation ``seq-mean-token-mean``: numerator = Σ over sequences with |τ| > 0 of Σ_t mask·ℓ_t / |τ|,
    denominator = their count; ``token-mean``: numerator = Σ mask·ℓ_t, denominator = Σ mask;
    ``token-mean-per-micro-batch``: numerator = Σ mask·ℓ_t, denominator = the sequences
    (:func:`micro_batch_denominator` turns it into the micro-batch's divisor).
    Metrics (detached, means over trainable tokens): ``clip_fraction`` (ratio outside the clip range)
    and ``ratio_mean`` over the unshaped rows when the ratio is used, ``kl`` (mean of the estimator)
    whenever ``ref_logprobs`` is given.
    """
    _check_batch(
        loss_mask, logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, token_weights=token_weights
    )
    if shaped is not None and shaped.shape != loss_mask.shape[:1]:
        raise ValueError(f"shaped must be one flag per sequence [B] = [{loss_mask.shape[0]}], got {list(shaped.shape)}")
    clip_low, clip_high, gamma = config.clip_low, config.clip_high, config.shaping_gamma
    mask = loss_mask.float()
    trainable = mask != 0
    adv = _per_token_advantages(advantages, loss_mask.shape)
    shaping = gamma is not None and shaped is not None
    shaped_rows = shaped.bool()[:, None] if shaping else torch.zeros_like(trainable[:, :1])
    metrics: dict[str, torch.Tensor] = {}
    if old_logprobs is not None and config.uses_ratio:
        # equivalent mutants: float("INF") (float() reads any case); below, a fill of 1.0 for 0.0 in the
        # torch.where of log_ratio, prob and the KL inputs: no result reads those (untrained or shaped) entries,
        # the fill only keeps a padded -inf out of exp
        low = 1.0 - clip_low if clip_low is not None else -float("inf")
        high = 1.0 + clip_high if clip_high is not None else float("inf")
        ratio_mask = mask * ~shaped_rows  # shaped rows get ratio 1: an off-context ratio never makes a NaN
        log_ratio = torch.where(ratio_mask != 0, logprobs - old_logprobs, 0.0)
        if config.ratio_level == "sequence":
            seq = (log_ratio * ratio_mask).sum(dim=1) / ratio_mask.sum(dim=1).clamp(min=1e-8)
            ratio = torch.exp(seq)[:, None].expand_as(logprobs)
        else:
            ratio = torch.exp(log_ratio)
        per_token = -torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)
        metrics["clip_fraction"] = _masked_mean(((ratio < low) | (ratio > high)).float(), ratio_mask)
        metrics["ratio_mean"] = _masked_mean(ratio, ratio_mask)
    else:
        per_token = -adv * logprobs
    if shaping:
        rows = shaped_rows & trainable
        prob = torch.exp(torch.where(rows, logprobs, 0.0))
        per_token = torch.where(rows, -adv * prob / (prob + gamma), per_token)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    if config.opmd_tau:
        per_token = per_token / (1.0 + config.opmd_tau)
    if ref_logprobs is not None:
        kl = kl_estimate(torch.where(trainable, logprobs, 0.0), torch.where(trainable, ref_logprobs, 0.0),
                         config.kl_estimator)
        metrics["kl"] = _masked_mean(kl, mask)
        if config.kl_coef > 0:
            per_token = per_token + config.kl_coef * kl
    terms = _aggregate(per_token, mask, config.aggregation)
    terms.metrics = metrics
    return terms


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> LossTerms:
    """Mean token negative log-likelihood of the targets: Σ −log p·mask / Σ mask."""
    _check_batch(loss_mask, logprobs=logprobs)
    mask = loss_mask.float()
    return LossTerms(-torch.where(mask != 0, logprobs * mask, 0.0).sum(), mask.sum())
