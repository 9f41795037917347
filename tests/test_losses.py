"""Loss functions against hand-computed values; chunked logprobs against the naive computation."""

from __future__ import annotations

import math

import pytest
import torch

from r3l_lightning.losses import loss_denominator, policy_loss, sft_loss, token_logprobs


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_logprobs_equal_naive_log_softmax(chunk_size, temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5))
    logp, ent = token_logprobs(logits, ids, temperature=temperature, chunk_size=chunk_size, with_entropy=True)
    naive_all = torch.log_softmax(logits[:, :-1] / temperature, -1)
    naive = naive_all.gather(2, ids[:, 1:, None]).squeeze(2)
    torch.testing.assert_close(logp[:, 1:], naive)
    assert logp[:, 0].abs().sum() == 0
    torch.testing.assert_close(ent[:, 1:], -(naive_all.exp() * naive_all).sum(-1))
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    (naive_grad,) = torch.autograd.grad(naive.sum(), logits)
    torch.testing.assert_close(grad, naive_grad)


LOGP = torch.tensor([[0.0, -1.0, -2.0, -0.5, -1.5], [0.0, -0.2, -0.4, -3.0, -1.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
ADV = torch.tensor([2.0, -1.0])


def test_reinforce_loss_by_hand():
    # seq 0: -(2)(-1 + -2)/2 = 3;  seq 1: -(-1)(-0.4 - 3 - 1)/3 = -4.4/3
    seq_mean = policy_loss(LOGP, MASK, ADV)
    assert seq_mean.numerator.item() == pytest.approx(3.0 - 4.4 / 3)
    assert seq_mean.denominator.item() == 2
    # token-mean: (6 - 4.4) / 5 tokens
    tok = policy_loss(LOGP, MASK, ADV, aggregation="token-mean")
    assert (tok.numerator / tok.denominator).item() == pytest.approx(1.6 / 5)


def test_masked_tokens_get_no_gradient():
    logp = LOGP.clone().requires_grad_(True)
    terms = policy_loss(logp, MASK, ADV)
    (terms.numerator / terms.denominator).backward()
    assert torch.all(logp.grad[MASK == 0] == 0)
    # d/dlogp of -(1/2)·Â/|τ|: seq 0 → -(1/2)(2/2) = -.5; seq 1 → -(1/2)(-1/3) = 1/6
    assert logp.grad[0, 1].item() == pytest.approx(-0.5)
    assert logp.grad[1, 3].item() == pytest.approx(1 / 6)


def test_micro_batch_numerators_sum_to_the_whole_batch():
    for agg in ("seq-mean-token-mean", "token-mean"):
        whole = policy_loss(LOGP, MASK, ADV, aggregation=agg)
        parts = [policy_loss(LOGP[i : i + 1], MASK[i : i + 1], ADV[i : i + 1], aggregation=agg) for i in range(2)]
        num = sum(p.numerator for p in parts)
        den = sum(loss_denominator(MASK[i : i + 1], agg) for i in range(2))
        assert (num / den).item() == pytest.approx((whole.numerator / whole.denominator).item())


def test_clipped_token_ratio_by_hand():
    logp = torch.tensor([[0.0, math.log(1.5), math.log(0.5)]])
    old = torch.zeros(1, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # A = +1: token 1 ratio 1.5 clipped to 1.2 → -1.2; token 2 ratio .5 → min(.5, .8) = .5 → -.5
    pos = policy_loss(logp, mask, torch.tensor([1.0]), old_logprobs=old, clip_low=0.2, clip_high=0.2)
    assert pos.numerator.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert pos.metrics["clip_fraction"].item() == pytest.approx(1.0)
    # A = -1: token 1: min(-1.5, -1.2) = -1.5 → 1.5; token 2: min(-.5, -.8) = -.8 → .8
    neg = policy_loss(logp, mask, torch.tensor([-1.0]), old_logprobs=old, clip_low=0.2, clip_high=0.28)
    assert neg.numerator.item() == pytest.approx((1.5 + 0.8) / 2)


def test_sequence_ratio_gspo_by_hand():
    logp = torch.tensor([[0.0, 0.1, 0.3]], requires_grad=True)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # s = exp(mean(.1, .3)) = exp(.2) = 1.2214; A = 1: clip to 1 + 4e-4 → loss per token -1.0004
    terms = policy_loss(logp, mask, torch.tensor([1.0]), old_logprobs=old, clip_low=3e-4, clip_high=4e-4,
                        ratio_level="sequence")
    assert terms.numerator.item() == pytest.approx(-1.0004)
    # inside the clip range the gradient flows through s: s = exp(.0001) for A = -1
    small = torch.tensor([[0.0, 0.0001, 0.0001]], requires_grad=True)
    t2 = policy_loss(small, mask, torch.tensor([-1.0]), old_logprobs=old, clip_low=3e-4, clip_high=4e-4,
                     ratio_level="sequence")
    assert t2.numerator.item() == pytest.approx(math.exp(0.0001))
    t2.numerator.backward()
    assert small.grad[0, 1].item() == pytest.approx(math.exp(0.0001) / 2)


def test_k3_kl_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    # δ = ref - logp = [-.5, 1]; k3 = e^δ - δ - 1 = [.106531, .718282]
    k3 = [math.exp(-0.5) + 0.5 - 1, math.e - 2]
    terms = policy_loss(logp, mask, torch.tensor([0.0]), ref_logprobs=ref, kl_coef=0.1, aggregation="token-mean")
    assert terms.numerator.item() == pytest.approx(0.1 * sum(k3))
    assert terms.metrics["kl"].item() == pytest.approx(sum(k3) / 2)


def test_sft_loss_is_mean_token_nll():
    terms = sft_loss(LOGP, MASK)
    assert (terms.numerator / terms.denominator).item() == pytest.approx((1 + 2 + 0.4 + 3 + 1) / 5)


def test_unknown_aggregation_is_named():
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(LOGP, MASK, ADV, aggregation="sum")
