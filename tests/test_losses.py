"""Loss functions against hand-computed values; chunked logprobs against the naive log-softmax."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.testing import assert_close

from r3l_lightning.losses import (
    AGGREGATIONS,
    LossConfig,
    head_token_logprobs,
    kl_estimate,
    loss_denominator,
    micro_batch_denominator,
    policy_loss,
    sft_loss,
    token_logprobs,
)

TIGHT = {"rtol": 1e-6, "atol": 1e-6}


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ----- token_logprobs ------------------------------------------------------------------------


def test_token_logprobs_by_hand():
    # vocab 2, logits [0, ln 3] → p = [.25, .75]; at T = 2: p₁ = √3/(1 + √3) = .63397459621556
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3])
    ids = torch.tensor([[1, 1, 0]])
    logp, ent = token_logprobs(logits, ids, with_entropy=True)
    # position 0 = 0; ln .75 = -.28768207245178; ln .25 = -1.38629436111989
    assert_close(logp, torch.tensor([[0.0, -0.2876820725, -1.3862943611]]), **TIGHT)
    # H = -(.25 ln .25 + .75 ln .75) = .34657359 + .21576155 = .56233514
    assert_close(ent, torch.tensor([[0.0, 0.5623351446, 0.5623351446]]), **TIGHT)
    logp_t, _ = token_logprobs(logits, ids, temperature=2.0)
    assert_close(logp_t[0, 1], scalar(-0.4557463944), **TIGHT)  # ln .63397459621556


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_naive_log_softmax(chunk_size, temperature):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    logp, ent = token_logprobs(logits, ids, temperature=temperature, chunk_size=chunk_size, with_entropy=True)
    naive_all = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    naive = naive_all.gather(2, ids[:, 1:, None]).squeeze(2)
    assert logp.dtype == torch.float32 and logp.shape == (2, 5)
    assert_close(logp[:, 1:], naive)
    assert torch.equal(logp[:, 0], torch.zeros(2)) and torch.equal(ent[:, 0], torch.zeros(2))
    assert_close(ent[:, 1:], -(naive_all.exp() * naive_all).sum(-1))
    assert not ent.requires_grad
    weights = torch.randn(2, 4)  # an arbitrary upstream gradient
    (grad,) = torch.autograd.grad((logp[:, 1:] * weights).sum(), logits)
    (naive_grad,) = torch.autograd.grad((naive * weights).sum(), logits)
    assert_close(grad, naive_grad)
    assert torch.equal(grad[:, -1], torch.zeros(2, 11))  # the last position predicts nothing


def test_backward_keeps_no_float32_copy_of_the_logits():
    # bf16 logits: everything saved for backward is the bf16 logits themselves or per-row vectors
    logits = torch.randn(2, 6, 50).to(torch.bfloat16).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, torch.randint(0, 50, (2, 6)), chunk_size=4)
    assert all(t.dtype == torch.bfloat16 or t.numel() <= 2 * 6 for t in saved)


def test_logprob_gradient_passes_gradcheck_in_float64():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, temperature=0.9, chunk_size=2)[0], (logits,))


def test_low_precision_logits_give_float32_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 9).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 9, (2, 4))
    logp, _ = token_logprobs(logits, ids, chunk_size=3)
    naive = torch.log_softmax(logits.float()[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    assert logp.dtype == torch.float32
    assert_close(logp[:, 1:], naive)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_logprobs_without_grad_and_of_length_one():
    logits = torch.randn(2, 1, 5)
    logp, ent = token_logprobs(logits, torch.zeros(2, 1, dtype=torch.long), with_entropy=True)
    assert torch.equal(logp, torch.zeros(2, 1)) and torch.equal(ent, torch.zeros(2, 1))
    with torch.no_grad():
        logp, ent = token_logprobs(torch.randn(1, 3, 5), torch.tensor([[1, 2, 3]]))
    assert ent is None and not logp.requires_grad
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, torch.zeros(2, 1, dtype=torch.long), chunk_size=0)


def test_head_logprobs_by_hand_only_at_targets():
    # hidden · Wᵀ with W = [[1, 0], [0, 1]] (vocab 2, hidden 2): hidden [0, ln 3] → logits [0, ln 3], p = [.25, .75]
    weight = torch.eye(2)
    hidden = torch.tensor([[[0.0, math.log(3.0)]] * 4])
    ids = torch.tensor([[1, 1, 0, 1]])
    targets = torch.tensor([[True, False, True, True]])  # position 0 predicts nothing: 0 even when set
    logp, ent = head_token_logprobs(hidden, weight, ids, targets, with_entropy=True)
    # ln .25 = -1.38629436111989 at t = 2, ln .75 = -.28768207245178 at t = 3; untargeted t = 1 and t = 0 stay 0
    assert_close(logp, torch.tensor([[0.0, 0.0, -1.3862943611, -0.2876820725]]), **TIGHT)
    assert_close(ent, torch.tensor([[0.0, 0.0, 0.5623351446, 0.5623351446]]), **TIGHT)  # as in the test above
    assert head_token_logprobs(hidden, weight, ids, targets)[1] is None  # no entropy unless asked


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logprobs_equal_full_logits_at_targets(chunk_size, temperature):
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    weight = torch.randn(13, 4, requires_grad=True)
    ids = torch.randint(0, 13, (2, 6))
    targets = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    logp, ent = head_token_logprobs(hidden, weight, ids, targets, temperature, chunk_size, with_entropy=True)
    full, full_ent = token_logprobs(hidden @ weight.T, ids, temperature=temperature, with_entropy=True)
    assert_close(logp, torch.where(targets, full, 0.0))
    assert_close(ent, torch.where(targets, full_ent, 0.0))
    upstream = torch.randn(2, 6)
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    full_grads = torch.autograd.grad((torch.where(targets, full, 0.0) * upstream).sum(), (hidden, weight))
    for grad, full_grad in zip(grads, full_grads):
        assert_close(grad, full_grad)
    assert torch.equal(grads[0][:, -1], torch.zeros(2, 4))  # the last position predicts nothing


def test_head_logprob_gradient_passes_gradcheck_in_float64():
    torch.manual_seed(4)
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (2, 4))
    targets = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda h, w: head_token_logprobs(h, w, ids, targets, temperature=0.8, chunk_size=2)[0], (hidden, weight))


def test_head_logprobs_under_autocast_project_in_bf16_and_softmax_in_float32():
    # float32 hidden states and weight (mixed-precision training): under CPU autocast the projection is done in
    # bfloat16 like the model's own lm_head, the log-softmax in float32, and the gradients come back in float32
    torch.manual_seed(5)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    ids = torch.randint(0, 9, (2, 5))
    targets = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = head_token_logprobs(hidden, weight, ids, targets, chunk_size=2)
    logits = hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T  # what the projection computes
    full, _ = token_logprobs(logits, ids)
    assert logp.dtype == torch.float32
    assert_close(logp, torch.where(targets, full, 0.0))
    upstream = torch.randn(2, 5)
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    full_grads = torch.autograd.grad((torch.where(targets, full, 0.0) * upstream).sum(), (hidden, weight))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    for grad, full_grad in zip(grads, full_grads):
        assert_close(grad, full_grad, rtol=2e-2, atol=2e-2)  # bfloat16 products


def test_head_weight_gradient_of_bf16_weights_accumulates_over_chunks_in_float32():
    # hidden [1, 1] and W = I (bf16): logits [1, 1], p = [.5, .5]; target 1 at each of 17 positions, so each
    # row's ∂logp/∂W = (onehot − p) ⊗ h = [[-.5, -.5], [.5, .5]], times its upstream gradient: 1 for the first
    # row, 2⁻⁹ for the 16 others. Σ = 1 + 16·2⁻⁹ = 1.03125 → ±.515625. A bf16 running sum would stay at ±.5:
    # each ±2⁻¹⁰ is below half a bf16 ulp of .5 (2⁻⁹) and would be rounded away, chunk after chunk.
    hidden = torch.ones(1, 18, 2, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.eye(2, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.ones(1, 18, dtype=torch.long)
    upstream = torch.full((1, 18), 2.0**-9)
    upstream[0, 1] = 1.0
    for chunk_size in (1, 1000):
        logp, _ = head_token_logprobs(hidden, weight, ids, torch.ones(1, 18, dtype=torch.bool), chunk_size=chunk_size)
        (grad_weight,) = torch.autograd.grad((logp * upstream).sum(), weight)
        assert grad_weight.dtype == torch.bfloat16
        assert torch.equal(grad_weight.float(), torch.tensor([[-0.515625, -0.515625], [0.515625, 0.515625]]))


def test_head_logprobs_check_shapes():
    with pytest.raises(ValueError, match="hidden"):
        head_token_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long),
                            torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        head_token_logprobs(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long),
                            torch.ones(1, 2, dtype=torch.bool), chunk_size=0)


# ----- policy loss: REINFORCE (R³L) ------------------------------------------------------------

LOGP = torch.tensor([[0.0, -1.0, -2.0, -0.5, -1.5], [0.0, -0.2, -0.4, -3.0, -1.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
ADV = torch.tensor([2.0, -1.0])


def test_reinforce_loss_by_hand_seq_mean_token_mean():
    # ℓ = -Â·logp. seq 0: tokens 1, 2 → (2 + 4)/2 = 3; seq 1: tokens 2..4 → (-.4 - 3 - 1)/3 = -1.4666667
    terms = policy_loss(LOGP, MASK, ADV)
    assert_close(terms.numerator, scalar(1.5333333333), **TIGHT)
    assert_close(terms.denominator, scalar(2.0), **TIGHT)
    assert_close(terms.numerator / terms.denominator, scalar(0.7666666667), **TIGHT)
    assert terms.metrics == {}


def test_reinforce_loss_by_hand_token_mean():
    # (2 + 4 - .4 - 3 - 1) / 5 tokens = 1.6/5
    terms = policy_loss(LOGP, MASK, ADV, LossConfig(aggregation="token-mean"))
    assert_close(terms.numerator, scalar(1.6), **TIGHT)
    assert_close(terms.denominator, scalar(5.0), **TIGHT)


def test_per_token_advantages_by_hand():
    # Â per token (values on masked tokens must not matter): row 0 tokens 1, 2 get 2, 1; row 1 tokens 2..4
    # get -1, -2, 3. ℓ = -Â·logp: 2·1 = 2, 1·2 = 2 | -(-1)(-.4) = -.4, -(-2)(-3) = -6, -(3)(-1) = 3
    adv = torch.tensor([[99.0, 2.0, 1.0, 99.0, 99.0], [99.0, 99.0, -1.0, -2.0, 3.0]])
    terms = policy_loss(LOGP, MASK, adv, LossConfig(aggregation="token-mean"))
    assert_close(terms.numerator, scalar(0.6), **TIGHT)  # 2 + 2 - .4 - 6 + 3
    assert_close(terms.denominator, scalar(5.0), **TIGHT)
    seq = policy_loss(LOGP, MASK, adv)  # row 0: (2 + 2)/2 = 2; row 1: (-.4 - 6 + 3)/3 = -1.1333333
    assert_close(seq.numerator, scalar(0.8666666667), **TIGHT)
    # one advantage per sequence is the same as that advantage on each of its tokens
    clip = LossConfig(clip_low=0.2, clip_high=0.2)
    per_sequence = policy_loss(LOGP, MASK, ADV, clip, old_logprobs=LOGP - 0.1)
    per_token = policy_loss(LOGP, MASK, ADV[:, None].expand(2, 5), clip, old_logprobs=LOGP - 0.1)
    assert torch.equal(per_sequence.numerator, per_token.numerator)


@pytest.mark.parametrize("shape", [(5, 2), (2, 1), (3,), (2, 5, 1), ()])
def test_advantages_of_any_other_shape_are_rejected(shape):
    # [B, 1] would broadcast to the right values but is still ambiguous: only [B] or [B, L] are accepted
    with pytest.raises(ValueError, match=r"advantages must be one per sequence \[B\] = \[2\] or one per token "
                                         r"\[B, L\] = \[2, 5\], got \[" + ", ".join(map(str, shape))):
        policy_loss(LOGP, MASK, torch.ones(shape))


def test_per_token_inputs_of_another_shape_are_rejected():
    with pytest.raises(ValueError, match=r"logprobs must have the shape of loss_mask \[2, 5\], got \[2, 4\]"):
        policy_loss(LOGP[:, :4], MASK, ADV)
    with pytest.raises(ValueError, match=r"old_logprobs must have the shape of loss_mask \[2, 5\], got \[5\]"):
        policy_loss(LOGP, MASK, ADV, LossConfig(clip_low=0.2), old_logprobs=LOGP[0])
    with pytest.raises(ValueError, match=r"ref_logprobs must have the shape of loss_mask \[2, 5\], got \[1, 5\]"):
        policy_loss(LOGP, MASK, ADV, LossConfig(kl_coef=0.1), ref_logprobs=LOGP[:1])
    with pytest.raises(ValueError, match=r"token_weights must have the shape of loss_mask \[2, 5\], got \[2\]"):
        policy_loss(LOGP, MASK, ADV, token_weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"shaped must be one flag per sequence \[B\] = \[2\], got \[2, 1\]"):
        policy_loss(LOGP, MASK, ADV, LossConfig(shaping_gamma=0.1), shaped=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"loss_mask must be \[B, L\]"):
        policy_loss(LOGP[0], MASK[0], ADV[:1])
    with pytest.raises(ValueError, match=r"logprobs must have the shape of loss_mask"):
        sft_loss(LOGP, MASK[:1])
    with pytest.raises(ValueError, match=r"loss_mask must be \[B, L\]"):
        loss_denominator(MASK[0], "token-mean")
    with pytest.raises(ValueError, match=r"logits \[B, L, V\] and input_ids \[B, L\]"):
        token_logprobs(torch.zeros(2, 3, 7), torch.zeros(2, 4, dtype=torch.long))


def test_weighted_mask():
    # one sequence, weights [1, .5] on ℓ = [2, 4]: (2 + 2)/1.5 for both aggregations
    mask = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0]])
    for agg, denominator in (("seq-mean-token-mean", 1.0), ("token-mean", 1.5)):
        terms = policy_loss(LOGP[:1], mask, ADV[:1], LossConfig(aggregation=agg))
        assert_close(terms.numerator / terms.denominator, scalar(2.6666666667), **TIGHT)
        assert_close(terms.denominator, scalar(denominator), **TIGHT)
    # a sequence whose only token weighs .5 (|τ| = .5 < 1): its mean is that token's ℓ = 2·1 = 2
    half = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0]])
    terms = policy_loss(LOGP[:1], half, ADV[:1])
    assert_close(terms.numerator, scalar(2.0), **TIGHT)
    assert_close(terms.denominator, scalar(1.0), **TIGHT)
    # the KL metric is the same weighted mean: k3 of that one token (δ = 0 - (-1) = 1) = e - 2
    kl = policy_loss(LOGP[:1], half, ADV[:1], ref_logprobs=torch.zeros(1, 5)).metrics["kl"]
    assert_close(kl, scalar(0.7182818285), **TIGHT)


def test_token_mean_per_micro_batch_sums_tokens_over_sequences():
    # numerator Σ mask·ℓ = 2 + 4 - .4 - 3 - 1 = 1.6 (as token-mean), denominator: the 2 sequences
    terms = policy_loss(LOGP, MASK, ADV, LossConfig(aggregation="token-mean-per-micro-batch"))
    assert_close(terms.numerator, scalar(1.6), **TIGHT)
    assert_close(terms.denominator, scalar(2.0), **TIGHT)


@pytest.mark.parametrize(
    ("aggregation", "grad_row0", "grad_row1"),
    [
        # seq-mean: ∂/∂logp of (1/2)·(-Â/|τ|): seq 0 → -(1/2)(2/2) = -.5; seq 1 → (1/2)(1/3) = 1/6
        ("seq-mean-token-mean", [0.0, -0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 1 / 6, 1 / 6, 1 / 6]),
        # token-mean: -Â/5 → -.4 and .2
        ("token-mean", [0.0, -0.4, -0.4, 0.0, 0.0], [0.0, 0.0, 0.2, 0.2, 0.2]),
    ],
)
def test_gradient_by_hand_and_masked_tokens_get_none(aggregation, grad_row0, grad_row1):
    logp = LOGP.clone().requires_grad_(True)
    terms = policy_loss(logp, MASK, ADV, LossConfig(aggregation=aggregation))
    (terms.numerator / terms.denominator).backward()
    assert_close(logp.grad, torch.tensor([grad_row0, grad_row1]), **TIGHT)
    assert torch.all(logp.grad[MASK == 0] == 0)


def test_padding_never_leaks_even_when_infinite():
    logp = LOGP.clone()
    logp[0, 4] = -float("inf")  # masked position
    logp.requires_grad_(True)
    terms = policy_loss(logp, MASK, ADV)
    assert_close(terms.numerator, scalar(1.5333333333), **TIGHT)
    terms.numerator.backward()
    assert logp.grad[0, 4] == 0


def test_micro_batch_numerators_sum_to_the_whole_batch():
    # a third row with no trainable token counts neither as a sequence nor as tokens
    logp = torch.cat([LOGP, torch.tensor([[0.0, -0.7, -0.1, -0.2, -0.3]])]).requires_grad_(True)
    mask = torch.cat([MASK, torch.zeros(1, 5)])
    adv = torch.cat([ADV, torch.tensor([5.0])])
    for agg, expected in (("seq-mean-token-mean", 0.7666666667), ("token-mean", 0.32)):
        whole = policy_loss(logp, mask, adv, LossConfig(aggregation=agg))
        assert_close(whole.numerator / whole.denominator, scalar(expected), **TIGHT)
        (whole_grad,) = torch.autograd.grad(whole.numerator / whole.denominator, logp)
        parts = [slice(0, 1), slice(1, 3)]
        denominator = sum(loss_denominator(mask[p], agg) for p in parts)
        numerator = sum(policy_loss(logp[p], mask[p], adv[p], LossConfig(aggregation=agg)).numerator for p in parts)
        assert_close(numerator / denominator, scalar(expected), **TIGHT)
        (parts_grad,) = torch.autograd.grad(numerator / denominator, logp)
        assert_close(parts_grad, whole_grad, **TIGHT)


def test_loss_denominator():
    mask = torch.cat([MASK, torch.zeros(1, 5)])
    assert_close(loss_denominator(mask, "seq-mean-token-mean"), scalar(2.0))
    assert_close(loss_denominator(mask, "token-mean"), scalar(5.0))
    with pytest.raises(ValueError, match="options: seq-mean-token-mean, token-mean"):
        loss_denominator(mask, "sum")
    # per micro-batch, the step denominator counts sequences (as seq-mean-token-mean does)
    assert_close(loss_denominator(mask, "token-mean-per-micro-batch"), scalar(2.0))
    # a sequence with a single trainable token, or a single token weighted .5, is a sequence
    single = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    assert_close(loss_denominator(single, "seq-mean-token-mean"), scalar(2.0))


def test_micro_batch_denominator_by_hand():
    step = scalar(6.0)  # the step's loss_denominator, e.g. 6 sequences over its micro-batches
    for agg in ("seq-mean-token-mean", "token-mean"):  # one mean over the step: the step's denominator as is
        assert micro_batch_denominator(MASK, agg, step) is step
    # token-mean-per-micro-batch: Σ mask · S / s = 5 tokens · 6 / 2 sequences = 15 (an empty row is no sequence)
    with_empty_row = torch.cat([MASK, torch.zeros(1, 5)])
    assert_close(micro_batch_denominator(with_empty_row, "token-mean-per-micro-batch", step), scalar(15.0), **TIGHT)
    # weights count as tokens: (1 + .5) · 6 / 1 = 9
    weighted = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0]])
    assert_close(micro_batch_denominator(weighted, "token-mean-per-micro-batch", step), scalar(9.0), **TIGHT)
    # a micro-batch without trainable tokens (numerator 0) gets a tiny positive divisor, never 0 (no NaN)
    empty = micro_batch_denominator(torch.zeros(2, 5), "token-mean-per-micro-batch", step)
    assert_close(empty, scalar(1e-8), rtol=1e-6, atol=0.0)


# ----- policy loss: clipped ratio, GSPO, KL ------------------------------------------------------

RATIO_LOGP = torch.tensor([[0.0, math.log(1.5), math.log(0.5), math.log(1.1)]])
RATIO_MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0]])


def test_clipped_token_ratio_by_hand_positive_advantage():
    # ratios [1.5, .5, 1.1], Â = 1, clip [.8, 1.28] (DAPO clip-higher):
    # min(r, clip(r)) = [1.28, .5, 1.1] → ℓ = [-1.28, -.5, -1.1] → mean -2.88/3 = -.96
    logp = RATIO_LOGP.clone().requires_grad_(True)
    terms = policy_loss(logp, RATIO_MASK, torch.tensor([1.0]), LossConfig(clip_low=0.2, clip_high=0.28),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(terms.numerator, scalar(-0.96), **TIGHT)
    assert_close(terms.metrics["clip_fraction"], scalar(2 / 3), **TIGHT)  # 1.5 and .5 are outside
    assert_close(terms.metrics["ratio_mean"], scalar(3.1 / 3), **TIGHT)
    assert not terms.metrics["ratio_mean"].requires_grad
    terms.numerator.backward()
    # clipped token: no gradient; others: ∂(-r·Â)/∂logp /3 = -r/3 → [-.5/3, -1.1/3]
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.1666666667, -0.3666666667]]), **TIGHT)


def test_clipped_token_ratio_by_hand_negative_advantage():
    # Â = -1: min(-r, -clip(r)) = [-1.5, -.8, -1.1] → ℓ = [1.5, .8, 1.1] → 3.4/3
    terms = policy_loss(RATIO_LOGP, RATIO_MASK, torch.tensor([-1.0]),
                        LossConfig(clip_low=0.2, clip_high=0.2, aggregation="token-mean"),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(terms.numerator, scalar(3.4), **TIGHT)
    assert_close(terms.denominator, scalar(3.0), **TIGHT)
    # only an upper bound: r = .5 is not clipped from below → ℓ = [-1.2, -.5, -1.1] for Â = 1
    upper = policy_loss(RATIO_LOGP, RATIO_MASK, torch.tensor([1.0]), LossConfig(clip_high=0.2),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(upper.numerator, scalar(-2.8 / 3), **TIGHT)
    assert_close(upper.metrics["clip_fraction"], scalar(1 / 3), **TIGHT)  # 1.5 only
    # ... and for Â = -1: min(-r, -min(r, 1.2)) = -r → ℓ = [1.5, .5, 1.1]
    upper = policy_loss(RATIO_LOGP, RATIO_MASK, torch.tensor([-1.0]), LossConfig(clip_high=0.2),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(upper.numerator, scalar(3.1 / 3), **TIGHT)
    # only a lower bound: r = 1.5 is not clipped from above; Â = -1: min(-r, -max(r, .8)) = [-1.5, -.8, -1.1]
    lower = policy_loss(RATIO_LOGP, RATIO_MASK, torch.tensor([-1.0]), LossConfig(clip_low=0.2),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(lower.numerator, scalar(3.4 / 3), **TIGHT)
    assert_close(lower.metrics["clip_fraction"], scalar(1 / 3), **TIGHT)  # .5 only


def test_clipped_token_ratio_scales_with_the_advantage():
    # Â = 2, clip [.8, 1.2]: min(2r, 2·clip(r)) = 2·[1.2, .5, 1.1] → ℓ = [-2.4, -1, -2.2] → mean -5.6/3
    terms = policy_loss(RATIO_LOGP, RATIO_MASK, torch.tensor([2.0]), LossConfig(clip_low=0.2, clip_high=0.2),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(terms.numerator, scalar(-5.6 / 3), **TIGHT)
    # Â = -2: min(-2r, -2·clip(r)) = -2·[1.5, .8, 1.1] → ℓ = [3, 1.6, 2.2] → mean 6.8/3
    terms = policy_loss(RATIO_LOGP, RATIO_MASK, torch.tensor([-2.0]), LossConfig(clip_low=0.2, clip_high=0.2),
                        old_logprobs=torch.zeros(1, 4))
    assert_close(terms.numerator, scalar(6.8 / 3), **TIGHT)


def test_a_ratio_on_the_clip_bound_is_not_counted_as_clipped():
    # on-policy (old = logp): r = 1 exactly; a zero-width range [1, 1] has it on both bounds, inside the range
    terms = policy_loss(LOGP, MASK, ADV, LossConfig(clip_low=0.0, clip_high=0.0), old_logprobs=LOGP.clone())
    assert_close(terms.metrics["clip_fraction"], scalar(0.0), **TIGHT)
    assert_close(terms.metrics["ratio_mean"], scalar(1.0), **TIGHT)


def test_old_logprobs_without_a_clip_range_are_ignored():
    plain = policy_loss(LOGP, MASK, ADV)
    with_old = policy_loss(LOGP, MASK, ADV, old_logprobs=torch.zeros(2, 5))
    assert_close(with_old.numerator, plain.numerator, **TIGHT)


def test_sequence_ratio_gspo_by_hand():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    gspo = LossConfig(clip_low=3e-4, clip_high=4e-4, ratio_level="sequence")
    # s = exp(mean(.1, .3)) = exp(.2) = 1.22140275816017 (the masked 9.0 is ignored)
    logp = torch.tensor([[0.0, 0.1, 0.3, 9.0]], requires_grad=True)
    # Â = 1: clip(s) = 1.0004 < s → ℓ = -1.0004 on every token, no gradient
    terms = policy_loss(logp, mask, torch.tensor([1.0]), gspo, old_logprobs=old)
    assert_close(terms.numerator, scalar(-1.0004), **TIGHT)
    assert_close(terms.metrics["clip_fraction"], scalar(1.0), **TIGHT)
    assert_close(terms.metrics["ratio_mean"], scalar(1.2214027582), **TIGHT)
    terms.numerator.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 4))
    # Â = -1: min(-s, -1.0004) = -s → ℓ = s, gradient through s: ∂s/∂logp_t = s/|τ| = .61070137908
    logp.grad = None
    terms = policy_loss(logp, mask, torch.tensor([-1.0]), gspo, old_logprobs=old)
    assert_close(terms.numerator, scalar(1.2214027582), **TIGHT)
    terms.numerator.backward()
    assert_close(logp.grad, torch.tensor([[0.0, 0.6107013791, 0.6107013791, 0.0]]), **TIGHT)
    # a weighted mask: the log-ratio is the weighted mean over the sequence, (.25·.1 + .25·.3)/.5 = .2 again
    weighted = policy_loss(logp, torch.tensor([[0.0, 0.25, 0.25, 0.0]]), torch.tensor([1.0]), gspo, old_logprobs=old)
    assert_close(weighted.metrics["ratio_mean"], scalar(1.2214027582), **TIGHT)


def test_sequence_ratio_is_per_sequence():
    # row 0: s = exp(mean(ln 2, 0)) = √2 = 1.41421356; row 1: s = exp(ln .5) = .5; Â = [1, 1], clip [.8, 1.2]
    # row 0 → -min(√2, 1.2) = -1.2; row 1 → -min(.5, .8) = -.5; seq-mean numerator = -1.7
    logp = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, math.log(0.5)]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    terms = policy_loss(logp, mask, torch.tensor([1.0, 1.0]),
                        LossConfig(clip_low=0.2, clip_high=0.2, ratio_level="sequence"), old_logprobs=torch.zeros(2, 3))
    assert_close(terms.numerator, scalar(-1.7), **TIGHT)
    # ratio_mean over the 3 trainable tokens: (2·√2 + .5)/3
    assert_close(terms.metrics["ratio_mean"], scalar(1.1094757082), **TIGHT)


def test_k3_kl_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # δ = ref - logp = [-.5, 1]; k3 = e^δ - δ - 1 = [.10653065971263, .71828182845905]
    terms = policy_loss(logp, mask, torch.tensor([0.0]), LossConfig(aggregation="token-mean", kl_coef=0.1),
                        ref_logprobs=ref)
    assert_close(terms.numerator, scalar(0.0824812488), **TIGHT)  # .1·(.10653066 + .71828183)
    assert_close(terms.metrics["kl"], scalar(0.4124062441), **TIGHT)
    (terms.numerator / terms.denominator).backward()
    # ∂k3/∂logp = 1 - e^δ = [.39346934, -1.71828183]; ·.1/2
    assert_close(logp.grad, torch.tensor([[0.0, 0.0196734670, -0.0859140914]]), **TIGHT)
    # with Â = 1 and seq-mean: ℓ = -logp + .1·k3 = [1.01065307, 2.07182818] → mean 1.54124062
    both = policy_loss(logp, mask, torch.tensor([1.0]), LossConfig(kl_coef=0.1), ref_logprobs=ref)
    assert_close(both.numerator, scalar(1.5412406244), **TIGHT)
    # kl_coef = 0: the KL is reported but not added
    monitor = policy_loss(logp, mask, torch.tensor([1.0]), ref_logprobs=ref)
    assert_close(monitor.numerator, scalar(1.5), **TIGHT)
    assert_close(monitor.metrics["kl"], scalar(0.4124062441), **TIGHT)
    # ... even when the estimate overflows (δ = 99: e^99 > float32's max): the loss stays finite
    far = policy_loss(logp, mask, torch.tensor([1.0]), ref_logprobs=torch.tensor([[0.0, 98.0, -1.0]]))
    assert far.metrics["kl"] == float("inf")
    assert_close(far.numerator, scalar(1.5), **TIGHT)


def test_k2_kl_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # the reference code's K2Fn: (logprob - ref_logprob)² · .5 = [.5², (-1)²]·.5 = [.125, .5]
    assert_close(kl_estimate(logp, ref, "k2")[0, 1:], torch.tensor([0.125, 0.5]), **TIGHT)
    # R³L's reference setting: k2, coefficient .001, token-mean: .001·(.125 + .5)/2 = .0003125
    terms = policy_loss(logp, mask, torch.tensor([0.0]),
                        LossConfig(aggregation="token-mean", kl_coef=0.001, kl_estimator="k2"), ref_logprobs=ref)
    assert_close(terms.numerator / terms.denominator, scalar(0.0003125), rtol=1e-6, atol=0.0)
    assert_close(terms.metrics["kl"], scalar(0.3125), **TIGHT)  # (.125 + .5)/2
    (terms.numerator / terms.denominator).backward()
    # ∂k2/∂logp = logp - ref = [.5, -1]; ·.001/2 = [.00025, -.0005]
    assert_close(logp.grad, torch.tensor([[0.0, 0.00025, -0.0005]]), rtol=1e-6, atol=0.0)
    # k3 of the same tokens (δ = ref - logp = [-.5, 1]): e^δ - δ - 1 = [.10653066, .71828183]; k3 is the default
    assert_close(kl_estimate(logp, ref, "k3")[0, 1:], torch.tensor([0.1065306597, 0.7182818285]), **TIGHT)
    assert_close(kl_estimate(logp, ref)[0, 1:], torch.tensor([0.1065306597, 0.7182818285]), **TIGHT)


def test_token_weights_weight_the_policy_term_but_not_the_kl():
    # w = [.5, 2] on row 0's tokens 1, 2 and [1, 1, 0] on row 1's 2..4 (values on masked tokens must not
    # matter). ℓ = -Â·logp = [2, 4 | -.4, -3, -1] → Σ w·ℓ = 1 + 8 - .4 - 3 + 0 = 5.6; k2 against ref = 0,
    # unweighted: ½·logp² = .5, 2, .08, 4.5, .5 → 7.58 → ·.001 = .00758; token-mean: 5.60758 / 5 = 1.121516
    weights = torch.tensor([[9.0, 0.5, 2.0, 9.0, 9.0], [9.0, 9.0, 1.0, 1.0, 0.0]], requires_grad=True)
    logp = LOGP.clone().requires_grad_(True)
    terms = policy_loss(logp, MASK, ADV, LossConfig(aggregation="token-mean", kl_coef=0.001, kl_estimator="k2"),
                        token_weights=weights, ref_logprobs=torch.zeros_like(LOGP))
    assert_close(terms.numerator, scalar(5.60758), **TIGHT)
    assert_close(terms.denominator, scalar(5.0), **TIGHT)  # |τ| unweighted
    terms.numerator.backward()
    assert weights.grad is None  # the weights are constants of the loss
    # ∂/∂logp = -Â·w + .001·logp: row 0: -2·.5 - .001 = -1.001, -2·2 - .002 = -4.002;
    # row 1: .9996, .997, -.001
    assert_close(logp.grad, torch.tensor([[0.0, -1.001, -4.002, 0.0, 0.0], [0.0, 0.0, 0.9996, 0.997, -0.001]]),
                 **TIGHT)


def test_opmd_tau_halves_the_token_mean_policy_term_but_not_the_kl():
    # the reference code's OPMD loss: masked_mean(-Â·logp)/(1 + τ) + kl_coef·masked_mean(k2), τ = 1.
    # policy: (2 + 4 - .4 - 3 - 1)/5 = .32 → /2 = .16; k2 against ref = 0: ½·logp² on the 5 trainable
    # tokens = .5, 2, .08, 4.5, .5 → mean 7.58/5 = 1.516 → ·.001 = .001516; total .161516
    ref = torch.zeros_like(LOGP)
    terms = policy_loss(LOGP, MASK, ADV, LossConfig(aggregation="token-mean", kl_coef=0.001, kl_estimator="k2",
                                                    opmd_tau=1.0), ref_logprobs=ref)
    assert_close(terms.numerator / terms.denominator, scalar(0.161516), rtol=1e-6, atol=0.0)
    plain = policy_loss(LOGP, MASK, ADV, LossConfig(aggregation="token-mean", opmd_tau=1.0))
    assert_close(plain.numerator / plain.denominator, scalar(0.16), **TIGHT)


# ----- policy loss: Critique-GRPO policy shaping --------------------------------------------------

# π = [.5, .25, .1] (row 0, Â = 2) and [.9, .4] (row 1, Â = -1); f(π) = π/(π + .1):
# row 0: .5/.6 = .83333333, .25/.35 = .71428571, .1/.2 = .5; row 1: .9/1 = .9, .4/.5 = .8
SHAPE_LOGP = torch.tensor([[0.0, math.log(0.5), math.log(0.25), math.log(0.1)],
                           [0.0, math.log(0.9), math.log(0.4), 0.0]])
SHAPE_MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
SHAPE_ADV = torch.tensor([2.0, -1.0])
BOTH = torch.tensor([True, True])


@pytest.mark.parametrize(
    ("aggregation", "numerator", "denominator", "normaliser"),
    [
        # ℓ = -Â·f(π): row 0 → -2·(.83333333 + .71428571 + .5)/3 = -1.36507937; row 1 → (.9 + .8)/2 = .85
        ("seq-mean-token-mean", -0.5150793651, 2.0, [[6.0], [4.0]]),  # 1/(|τ|·2 sequences)
        # Σ ℓ = -4.0952381 + 1.7 over 5 tokens
        ("token-mean", -2.3952380952, 5.0, [[5.0], [5.0]]),
    ],
)
def test_policy_shaping_by_hand(aggregation, numerator, denominator, normaliser):
    logp = SHAPE_LOGP.clone().requires_grad_(True)
    terms = policy_loss(logp, SHAPE_MASK, SHAPE_ADV, LossConfig(aggregation=aggregation, shaping_gamma=0.1),
                        shaped=BOTH)
    assert_close(terms.numerator, scalar(numerator), **TIGHT)
    assert_close(terms.denominator, scalar(denominator), **TIGHT)
    assert terms.metrics == {}
    (terms.numerator / terms.denominator).backward()
    # ∂f(π)/∂log π = f'(π)·π = γ·π/(π + γ)² (chain rule through π = exp(log π)); ×Â: the objective's
    # row 0 (Â = 2): .1·.5/.36 = .13888889, .1·.25/.1225 = .20408163, .1·.1/.04 = .25
    #                → ×2 = .27777778, .40816327, .5
    # row 1 (Â = -1): .1·.9/1 = .09, .1·.4/.25 = .16 → ×(-1) = -.09, -.16
    # the loss is minus the objective, divided by the aggregation's normaliser
    objective_grad = torch.tensor([[0.0, 0.2777777778, 0.4081632653, 0.5], [0.0, -0.09, -0.16, 0.0]])
    assert_close(logp.grad, -objective_grad / torch.tensor(normaliser), **TIGHT)


def test_mixed_shaped_and_unshaped_rows_are_the_sum_of_both():
    from r3l_lightning.data import collate
    from r3l_lightning.trajectory import TrainingSample

    # the flag travels from the sample kind through collate: row 0 a refinement, row 1 an on-policy sample
    rows = [TrainingSample([1, 2, 3, 4], [0, 1, 1, 1], 2.0, "refinement"),
            TrainingSample([1, 2, 3], [0, 1, 1], -1.0, "base")]
    shaped = collate(rows)["shaped"]
    assert shaped.tolist() == [True, False]
    # row 1: ratios .9/.6 = 1.5 and .4/.8 = .5, Â = -1, clip [.8, 1.2] → ℓ = max(r, clip(r)) = [1.5, .8],
    # mean 1.15; row 0's rollout logprobs (-100) are ignored: it is shaped, -1.36507937 as above
    # → seq-mean numerator -.21507937
    old = torch.tensor([[0.0, -100.0, -100.0, -100.0], [0.0, math.log(0.6), math.log(0.8), 0.0]])
    for agg in AGGREGATIONS:
        logp = SHAPE_LOGP.clone().requires_grad_(True)
        config = LossConfig(aggregation=agg, clip_low=0.2, clip_high=0.2, shaping_gamma=0.1)
        mixed = policy_loss(logp, SHAPE_MASK, SHAPE_ADV, config, old_logprobs=old, shaped=shaped)
        (mixed_grad,) = torch.autograd.grad(mixed.numerator, logp)
        assert torch.isfinite(mixed_grad).all()
        alone = [policy_loss(logp[i : i + 1], SHAPE_MASK[i : i + 1], SHAPE_ADV[i : i + 1], config,
                             old_logprobs=old[i : i + 1], shaped=shaped[i : i + 1]) for i in range(2)]
        assert_close(mixed.numerator, alone[0].numerator + alone[1].numerator, **TIGHT)
        assert_close(mixed.denominator, alone[0].denominator + alone[1].denominator, **TIGHT)
        (alone_grad,) = torch.autograd.grad(alone[0].numerator + alone[1].numerator, logp)
        assert_close(mixed_grad, alone_grad, **TIGHT)
    mixed = policy_loss(SHAPE_LOGP, SHAPE_MASK, SHAPE_ADV, LossConfig(clip_low=0.2, clip_high=0.2, shaping_gamma=0.1),
                        old_logprobs=old, shaped=shaped)
    assert_close(mixed.numerator, scalar(-0.2150793651), **TIGHT)
    # ratio metrics cover the unshaped row only: both of its ratios are outside [.8, 1.2], mean (1.5 + .5)/2
    assert_close(mixed.metrics["clip_fraction"], scalar(1.0), **TIGHT)
    assert_close(mixed.metrics["ratio_mean"], scalar(1.0), **TIGHT)


@pytest.mark.parametrize(
    ("config", "tensors"),
    [
        ({}, {}),
        ({"aggregation": "token-mean"}, {}),
        ({"clip_low": 0.2, "clip_high": 0.28}, {"old_logprobs": torch.zeros(2, 4)}),
        ({"clip_low": 3e-4, "clip_high": 4e-4, "ratio_level": "sequence"}, {"old_logprobs": torch.full((2, 4), -0.3)}),
        ({"kl_coef": 0.01}, {"ref_logprobs": torch.full((2, 4), -1.0)}),
    ],
    ids=["reinforce", "token-mean", "clipped-ratio", "gspo", "kl"],
)
def test_without_shaping_gamma_every_result_is_unchanged(config, tensors):
    def run(shaped=None, gamma=None):
        logp = SHAPE_LOGP.clone().requires_grad_(True)
        terms = policy_loss(logp, SHAPE_MASK, SHAPE_ADV, LossConfig(**config, shaping_gamma=gamma), shaped=shaped,
                            **tensors)
        (grad,) = torch.autograd.grad(terms.numerator / terms.denominator, logp)
        return terms, grad

    plain, plain_grad = run()
    # flagged rows but γ = None, or γ set but no row flagged: the loss as before, bit for bit
    for shaped, gamma in ((BOTH, None), (~BOTH, 0.1)):
        terms, grad = run(shaped, gamma)
        assert torch.equal(terms.numerator, plain.numerator) and torch.equal(terms.denominator, plain.denominator)
        assert terms.metrics.keys() == plain.metrics.keys()
        assert all(torch.equal(terms.metrics[k], plain.metrics[k]) for k in plain.metrics)
        assert torch.equal(grad, plain_grad)


def test_sft_loss_is_mean_token_nll():
    # targets: 1, 2 (row 0) and .4, 3, 1 (row 1) → 7.4 / 5
    terms = sft_loss(LOGP, MASK)
    assert_close(terms.numerator, scalar(7.4), **TIGHT)
    assert_close(terms.denominator, scalar(5.0), **TIGHT)
    assert_close(terms.numerator / terms.denominator, scalar(1.48), **TIGHT)
    # a weighted mask [1, .5] on targets 1, 2: (1·1 + .5·2) / 1.5
    weighted = sft_loss(LOGP[:1], torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0]]))
    assert_close(weighted.numerator, scalar(2.0), **TIGHT)
    assert_close(weighted.denominator, scalar(1.5), **TIGHT)


# ----- LossConfig: every value and combination is checked once, when the config is made ---------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"aggregation": "sum"}, "model.loss.aggregation='sum': use one of seq-mean-token-mean, token-mean, "
                                 "token-mean-per-micro-batch"),
        ({"clip_low": 0.2, "ratio_level": "turn"}, "model.loss.ratio_level='turn': use one of token, sequence"),
        ({"clip_low": 0.2, "old_logprobs": "engine"}, "model.loss.old_logprobs='engine': use one of trainer, rollout"),
        ({"kl_coef": 0.1, "kl_estimator": "k1"}, "model.loss.kl_estimator='k1': use one of k3, k2"),
        ({"clip_low": -1}, "model.loss.clip_low must be >= 0, got -1"),
        ({"clip_high": -0.2}, "model.loss.clip_high must be >= 0, got -0.2"),
        ({"sft_coef": -0.5}, "model.loss.sft_coef must be >= 0, got -0.5"),
        ({"kl_coef": -0.01}, "model.loss.kl_coef must be >= 0, got -0.01"),
        ({"opmd_tau": -1.0}, "model.loss.opmd_tau must be >= 0, got -1"),
        ({"shaping_gamma": 0.0}, "model.loss.shaping_gamma must be > 0, got 0"),
        ({"logit_temperature": 0}, "model.loss.logit_temperature must be > 0, got 0"),
        ({"logit_temperature": float("nan")}, "model.loss.logit_temperature must be > 0, got nan"),
        # settings of the clipped ratio without a clip range would silently train plain REINFORCE
        ({"ratio_level": "sequence"}, "model.loss.ratio_level=sequence has no effect without a clip range: "
                                      "set model.loss.clip_low and/or model.loss.clip_high"),
        ({"old_logprobs": "rollout"}, "model.loss.old_logprobs=rollout has no effect without a clip range"),
    ],
)
def test_invalid_loss_configs_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LossConfig(**fields)


def test_loss_config_defaults_are_the_papers_r3l():
    config = LossConfig()
    assert not config.uses_ratio and config.kl_coef == 0 and config.shaping_gamma is None and config.opmd_tau == 0
    assert config.aggregation == "seq-mean-token-mean" and config.sft_coef == 1.0 and config.logit_temperature == 1.0
    # either side of the clip range turns the ratio on, and with it the ratio's own settings
    assert LossConfig(clip_high=0.2, ratio_level="sequence", old_logprobs="rollout").uses_ratio
    assert LossConfig(clip_low=0.0).uses_ratio
