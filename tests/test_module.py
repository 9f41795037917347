"""R3LModule loss: exact value against a naive formula, correct accumulation, zero grads on masked tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from r3l_lightning.data import collate
from r3l_lightning.losses import LossConfig
from r3l_lightning.models import TINY_RANDOM
from r3l_lightning.module import R3LModule
from r3l_lightning.trajectory import TrainingSample


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return R3LModule(TINY_RANDOM, loss=LossConfig(sft_coef=0.5))


def samples() -> list[TrainingSample]:
    return [
        TrainingSample([5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 1, 0], 2.0, "base"),
        TrainingSample([11, 12, 13, 14], [0, 1, 1, 0], -0.5, "distill"),
        TrainingSample([15, 16, 17, 18, 19], [0, 0, 0, 1, 1], 1.0, "sft_retry"),
        TrainingSample([20, 21, 22], [0, 1, 1], 3.0, "base"),
    ]


def naive_loss(policy, batch: list[TrainingSample], sft_coef: float) -> torch.Tensor:
    """-(1/|G|) Σ_τ (1/|τ|) Σ_t mask Â log π  +  λ · mean SFT NLL, one sequence at a time."""
    rl_terms, sft_nll, sft_tokens = [], 0.0, 0
    for s in batch:
        ids = torch.tensor([s.input_ids])
        logp = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].float(), -1)
        lp = logp.gather(1, ids[0, 1:, None]).squeeze(1)
        mask = torch.tensor(s.loss_mask[1:])
        if s.is_sft:
            sft_nll = sft_nll - (lp * mask).sum()
            sft_tokens += int(mask.sum())
        else:
            rl_terms.append(-(s.advantage * lp * mask).sum() / mask.sum())
    return torch.stack(rl_terms).mean() + sft_coef * sft_nll / sft_tokens


def step_loss(module: R3LModule, micro_batches: list[list[TrainingSample]]) -> torch.Tensor:
    batch = [collate(mb) for mb in micro_batches]
    rl_denom, sft_denom = module._global_denominators(batch)
    total = 0.0
    for mb in batch:
        loss, _ = module.micro_batch_loss(mb, rl_denom, sft_denom)
        total = total + loss
    return total


def test_step_loss_equals_the_spec_formula(module):
    expected = naive_loss(module.policy, samples(), sft_coef=0.5)
    got = step_loss(module, [samples()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_accumulation_over_uneven_micro_batches_equals_one_big_batch(module):
    module.policy.zero_grad()
    one = step_loss(module, [samples()])
    one.backward()
    grads_one = [p.grad.clone() for p in module.policy.parameters()]
    module.policy.zero_grad()
    s = samples()
    split = [[s[0]], [s[1], s[2]], [s[3]]]  # different token counts per micro-batch
    parts = [collate(mb) for mb in split]
    rl_denom, sft_denom = module._global_denominators(parts)
    total = 0.0
    for mb in parts:
        loss, _ = module.micro_batch_loss(mb, rl_denom, sft_denom)
        loss.backward()  # as training_step does: one backward per micro-batch
        total += loss.item()
    torch.testing.assert_close(torch.tensor(total), one.detach(), rtol=1e-5, atol=1e-6)
    # fp32 kernels block differently for different padded widths: a wrong denominator is off by a
    # factor, float reordering by ~1e-5 of the gradients' scale (measured on AMX machines)
    for g1, p in zip(grads_one, module.policy.parameters()):
        torch.testing.assert_close(p.grad, g1, rtol=1e-3, atol=5e-5)
    module.policy.zero_grad()


def test_masked_tokens_get_zero_gradient(module):
    captured = {}

    def keep_logits(_m, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = module.policy.model.norm.register_forward_hook(keep_logits)  # the last hidden states
    try:
        batch = collate([samples()[0]])
        loss, _ = module.micro_batch_loss(batch, torch.tensor(1.0), torch.tensor(1.0))
        loss.backward()
    finally:
        handle.remove()
        module.policy.zero_grad()
    grad = captured["logits"].grad[0]  # row t-1 predicts token t
    mask = batch["loss_mask"][0]
    for t in range(1, mask.numel()):
        norm = grad[t - 1].abs().sum().item()
        assert (norm > 0) == bool(mask[t]), f"token {t}: mask {mask[t]}, grad norm {norm}"
    assert grad[-1].abs().sum() == 0  # the last position predicts nothing


def test_trained_positions_only_path_equals_full_logits(module, monkeypatch):
    """The loss projects only trained positions onto the vocabulary (never calling ``lm_head`` on the whole
    sequence), and gives the loss and gradients of the full-logits path."""
    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.policy.zero_grad()
        loss = step_loss(module, [samples()])
        loss.backward()
        grads = [p.grad.clone() for p in module.policy.parameters()]
        module.policy.zero_grad()
        return loss.detach(), grads

    head_calls = []
    handle = module.policy.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        loss, grads = step()
        assert head_calls == []
        monkeypatch.setattr("r3l_lightning.module.output_projection", lambda model: None)
        full_loss, full_grads = step()
        assert head_calls == [1]  # one micro-batch: the full logits once
    finally:
        handle.remove()
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    # the same sums in another order (hidden · Wᵀ per row instead of per batch): measured max difference 8.5e-6
    # on 3 of 6.3M gradient elements; a wrong row or mask would differ at the gradients' own scale
    for grad, full_grad in zip(grads, full_grads):
        torch.testing.assert_close(grad, full_grad, rtol=1e-3, atol=5e-5)


def test_padding_rows_contribute_nothing(module):
    pad = TrainingSample([0, 0], [0.0, 0.0], 0.0, "base")
    with_pad = step_loss(module, [samples(), [pad]])
    without = step_loss(module, [samples()])
    torch.testing.assert_close(with_pad, without)


def test_critique_grpo_refinement_rows_get_policy_shaping(module):
    """A refinement row trains on -(1/|τ|) Σ_t Â·π_t/(π_t + γ); a base row keeps REINFORCE (no clip range)."""
    gamma = 0.1
    batch = [TrainingSample([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], 1.5, "refinement"),
             TrainingSample([20, 21, 22], [0, 1, 1], -0.5, "base")]
    expected = []
    for s in batch:
        ids = torch.tensor([s.input_ids])
        lp = torch.log_softmax(module.policy(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
        lp, mask = lp.squeeze(1), torch.tensor(s.loss_mask[1:])
        per_token = lp.exp() / (lp.exp() + gamma) if s.objective == "shaped" else lp
        expected.append(-(s.advantage * per_token * mask).sum() / mask.sum())
    config = module.loss_config
    module.loss_config = replace(config, shaping_gamma=gamma)
    try:
        got = step_loss(module, [batch])
    finally:
        module.loss_config = config
    torch.testing.assert_close(got, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


class _TwoRankStrategy:
    """Stands in for a 2-rank strategy: ``reduce(sum)`` adds the other rank's step counts."""

    def __init__(self, other_rank: torch.Tensor) -> None:
        self.other_rank = other_rank

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + self.other_rank


class _TwoRankTrainer:
    world_size = 2

    def __init__(self, other_rank: torch.Tensor) -> None:
        self.strategy = _TwoRankStrategy(other_rank)


def test_step_denominators_are_summed_over_ranks(module):
    """Each rank divides by (global count / world size): DDP then averages the ranks' gradients."""
    # this rank: RL rows with a trainable token = 3 (the sft_retry row is not RL); SFT tokens = 2
    # the other rank: 5 RL rows, 6 SFT tokens → global (8, 8) → per rank (8/2, 8/2) = (4, 4)
    batch = [collate(samples())]
    module._trainer = _TwoRankTrainer(torch.tensor([5.0, 6.0]))
    try:
        rl_denom, sft_denom = module._global_denominators(batch)
    finally:
        module._trainer = None
    assert (rl_denom.item(), sft_denom.item()) == (4.0, 4.0)


def test_reference_code_loss_settings_reach_the_loss():
    """token-mean ÷ (1 + τ) and a k2 KL against a reference model, as the r3l_authors_code overlay sets them."""
    torch.manual_seed(0)
    authors = R3LModule(TINY_RANDOM, loss=LossConfig(aggregation="token-mean", opmd_tau=1.0, kl_coef=0.001,
                                                     kl_estimator="k2"))
    assert authors.reference is not None  # loaded because kl_coef > 0
    with torch.no_grad():  # move the policy away from the reference: a non-zero KL
        for p in authors.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = [s for s in samples() if not s.is_sft]
    terms, k2, tokens = [], [], 0
    for s in batch:
        ids = torch.tensor([s.input_ids])
        lp = torch.log_softmax(authors.policy(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
        ref = torch.log_softmax(authors.reference(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
        mask = torch.tensor(s.loss_mask[1:])
        terms.append(-(s.advantage * lp.squeeze(1) * mask).sum())
        k2.append((0.5 * (lp - ref).squeeze(1) ** 2 * mask).sum())
        tokens += int(mask.sum())
    # the reference code: masked_mean(-Â·log π)/(1 + τ) + kl_coef·masked_mean(½(log π − log π_ref)²)
    expected = torch.stack(terms).sum() / tokens / 2 + 0.001 * torch.stack(k2).sum() / tokens
    assert torch.stack(k2).sum() > 0
    torch.testing.assert_close(step_loss(authors, [batch]), expected, rtol=1e-5, atol=1e-7)


def test_grad_norm_is_the_global_norm_before_clipping(module):
    params = [p for p in module.policy.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 2.0 if i == 0 else 0.0)
    # only the first tensor has a gradient: 2 in each of its n entries, so the norm is 2·√n
    expected = 2.0 * params[0].numel() ** 0.5
    norm = module._clip_gradients(None, max_norm=None)  # None: no clipping, the norm is still measured
    torch.testing.assert_close(norm, torch.tensor(expected), rtol=1e-6, atol=0)
    assert params[0].grad.eq(2.0).all()
    module.policy.zero_grad(set_to_none=True)


def test_adamw_is_fused_for_plain_weights_and_not_for_sharded_or_integer_ones(module):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gloo_group import one_process_gloo_group
    from r3l_lightning.module import fused_adamw_applies

    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True  # the policy's plain CPU weights
    assert fused_adamw_applies([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)])
    assert not fused_adamw_applies([])
    assert not fused_adamw_applies([torch.zeros(2), torch.zeros(2, dtype=torch.long)])
    with one_process_gloo_group():  # FSDP2's sharded weights: foreach AdamW
        mesh = init_device_mesh("cpu", (1,))
        assert not fused_adamw_applies([distribute_tensor(torch.zeros(4), mesh, [Shard(0)])])
