"""Rollout-vs-trainer mismatch metrics and the TIS/MIS correction: hand-computed values, the module's loss
with a correction, and the per-kind metrics in the CSV of a fit."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from r3l_lightning.cli import cli_main
from r3l_lightning.data import collate
from r3l_lightning.losses import LossConfig, policy_loss
from r3l_lightning.mismatch import MismatchTotals, RolloutCorrection, correction_weights, kind_indices, rollout_corrected
from r3l_lightning.models import TINY_RANDOM
from r3l_lightning.module import R3LModule
from r3l_lightning.trajectory import TrainingSample

from test_cli import SMOKE

LN15, LN3, LN4 = math.log(1.5), math.log(3.0), math.log(4.0)


def _batch():
    """Row 0 (base): Δ = ln 3, −ln 4, 0 on its trainable tokens 1..3 (r = 3, 0.25, 1); token 4 is masked
    with a huge Δ. Row 1 (distill): Δ = ln 1.5 on token 1 (r = 1.5). Row 2 (base) has no rollout logprobs."""
    trainer = torch.tensor([[0.0, -1.0, -2.0, -0.5, -0.1], [0.0, -1.0, 0.0, 0.0, 0.0], [0.0, -3.0, 0.0, 0.0, 0.0]])
    delta = torch.tensor([[0.0, LN3, -LN4, 0.0, 50.0], [0.0, LN15, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    kinds = kind_indices(["base", "distill", "base"])
    has = torch.tensor([True, True, False])
    return trainer, trainer - delta, mask, kinds, has


def test_mismatch_metrics_by_hand_per_kind():
    trainer, rollout, mask, kinds, has = _batch()
    totals = MismatchTotals()
    totals.add(trainer[:1], rollout[:1], mask[:1], kinds[:1], has[:1])  # two micro-batches accumulate
    totals.add(trainer[1:], rollout[1:], mask[1:], kinds[1:], has[1:])
    m = totals.metrics()
    # base: |Δ| = (ln 3 + ln 4 + 0)/3 = 0.828302; k3 = r − 1 − ln r: (3 − 1 − ln 3) + (0.25 − 1 + ln 4) + 0
    # = 0.901388 + 0.636294 = 1.537682, /3 = 0.512561; r = 3 and 0.25 leave [0.5, 2]: 2/3; max r = 3
    assert m["mismatch/base/abs_diff_mean"] == pytest.approx((LN3 + LN4) / 3)
    assert m["mismatch/base/k3_kl"] == pytest.approx((2 - LN3 + LN4 - 0.75) / 3)
    assert m["mismatch/base/out_of_range_fraction"] == pytest.approx(2 / 3)
    assert m["mismatch/base/ratio_max"] == pytest.approx(3.0)
    assert m["mismatch/base/tokens"] == 3  # the masked token and the row without logprobs are not counted
    # distill: one token, r = 1.5: |Δ| = ln 1.5 = 0.405465, k3 = 1.5 − 1 − ln 1.5 = 0.094535, inside [0.5, 2]
    assert m["mismatch/distill/abs_diff_mean"] == pytest.approx(LN15)
    assert m["mismatch/distill/k3_kl"] == pytest.approx(0.5 - LN15)
    assert m["mismatch/distill/out_of_range_fraction"] == 0.0
    assert m["mismatch/distill/ratio_max"] == pytest.approx(1.5)
    assert not any(k.startswith(("mismatch/sft", "mismatch/retry")) for k in m)  # kinds absent: not logged


def test_unknown_sample_kind_is_named():
    with pytest.raises(ValueError, match="unknown sample kind.*'guided'"):
        kind_indices(["base", "guided"])


@pytest.mark.parametrize("mode, expected_weights, numerator", [
    # base row: r = 3, 0.25, 1; cap 2. tis w = min(r, 2) = 2, 0.25, 1; mis w = 1[0.5 <= r <= 2] = 0, 0, 1.
    # seq-mean-token-mean with Â = 2 on logprobs −1, −2, −0.5 (|τ| = 3, unchanged by the weights):
    #   tis: −(2/3)·(2·(−1) + 0.25·(−2) + 1·(−0.5)) = −(2/3)·(−3) = 2.0
    #   mis: −(2/3)·(0 + 0 + 1·(−0.5)) = 1/3
    # the distill row (Â = −1, logprob −1, r = 1.5) is exempt: −(−1)·(−1)/1 = −1 in both modes
    ("tis", [2.0, 0.25, 1.0], 2.0 - 1.0),
    ("mis", [0.0, 0.0, 1.0], 1.0 / 3.0 - 1.0),
])
def test_correction_loss_by_hand(mode, expected_weights, numerator):
    trainer, rollout, mask, kinds, has = _batch()
    trainer, rollout, mask, kinds, has = trainer[:2], rollout[:2], mask[:2], kinds[:2], has[:2]
    logprobs = trainer.clone().requires_grad_(True)
    corrected = rollout_corrected(kinds) & has  # the registry marks base only: the distill row is exempt
    weights, capped = correction_weights(logprobs, rollout, corrected, RolloutCorrection(mode, cap=2.0))
    torch.testing.assert_close(weights[0, 1:4], torch.tensor(expected_weights))
    assert weights[1].eq(1.0).all()  # distill: exempt
    assert capped[0, 1:4].tolist() == ([True, False, False] if mode == "tis" else [True, True, False])
    terms = policy_loss(logprobs, mask, torch.tensor([2.0, -1.0]), token_weights=weights)
    assert terms.numerator.item() == pytest.approx(numerator)
    assert terms.denominator.item() == 2.0
    terms.numerator.backward()
    # no gradient through the weight: ∂/∂logπ_t = −Â·w_t/|τ| = −(2/3)·w_t on the base row
    torch.testing.assert_close(logprobs.grad[0, 1:4], -2.0 / 3.0 * torch.tensor(expected_weights))


def test_correction_none_and_config_errors():
    trainer, rollout, mask, kinds, has = _batch()
    assert correction_weights(trainer, rollout, has, RolloutCorrection()) is None  # the paper: no correction
    with pytest.raises(ValueError, match="rollout_correction.mode='clip'"):
        RolloutCorrection("clip")
    with pytest.raises(ValueError, match="rollout_correction.cap=0.5"):
        RolloutCorrection("mis", cap=0.5)
    with pytest.raises(ValueError, match="tis would weight by .* twice"):
        R3LModule(TINY_RANDOM, loss=LossConfig(clip_low=0.2, clip_high=0.2, old_logprobs="rollout"),
                  rollout_correction=RolloutCorrection("tis"))


@pytest.fixture(scope="module")
def tis_module():
    torch.manual_seed(0)
    return R3LModule(TINY_RANDOM, rollout_correction=RolloutCorrection("tis", cap=1.5))


def test_module_loss_with_tis_equals_the_formula(tis_module):
    """−(1/|G|) Σ_τ (1/|τ|) Σ_t w_t Â log π_t with w_t = min(π_t/π_rollout,t, 1.5) on base rows, 1 on distill."""
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    masks = [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0]]
    with torch.no_grad():
        exact = [torch.log_softmax(tis_module.policy(input_ids=torch.tensor([i])).logits[0, :-1], -1)
                 .gather(1, torch.tensor(i[1:])[:, None]).squeeze(1) for i in ids]
    # rollout logprobs off by Δ = +1, −0.2, −2 on the base row's trainable tokens 2, 3, 4 (r = e^Δ = 2.72,
    # 0.82, 0.14 → w = 1.5, 0.82, 0.14) and by +1 on the distill row (exempt: w = 1)
    shifts = [torch.tensor([0.0, 1.0, -0.2, -2.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])]  # index t−1: token t
    old = [[0.0] + (lp - sh).tolist() for lp, sh in zip(exact, shifts)]
    batch = [TrainingSample(ids[0], masks[0], 2.0, "base", old_logprobs=old[0]),
             TrainingSample(ids[1], masks[1], -0.5, "distill", old_logprobs=old[1])]
    mb = collate(batch)
    loss, metrics = tis_module.micro_batch_loss(mb, torch.tensor(2.0), torch.tensor(1.0))
    weights = [torch.exp(shifts[0]).clamp(max=1.5), torch.ones(3)]
    expected = sum(-s.advantage * (w * lp * torch.tensor(s.loss_mask[1:])).sum() / sum(s.loss_mask)
                   for s, w, lp in zip(batch, weights, exact)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["correction_tokens"] == 3 and metrics["correction_capped"] == 1  # only r = e > 1.5
    torch.testing.assert_close(metrics["correction_weight_sum"], weights[0][1:4].sum(), rtol=1e-5, atol=1e-6)


def test_fit_logs_mismatch_per_kind_to_the_csv(tmp_path, monkeypatch):
    """With the policy itself as the rollout engine (HFEngine, fp32) the first step's base mismatch is
    numerical noise: a logprob misaligned by one token or a wrong temperature would show as O(1)."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(SMOKE), "--trainer.max_epochs", "1", "--data.groups_per_step", "2",
              "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback}]",
              "--trainer.enable_checkpointing", "false"])
    (metrics,) = tmp_path.glob("runs/smoke/csv/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert len(rows) == 1
    row = rows[0]
    assert float(row["mismatch/base/tokens"]) > 0
    assert float(row["mismatch/base/abs_diff_mean"]) < 1e-3
    assert float(row["mismatch/base/k3_kl"]) < 1e-5
    assert float(row["mismatch/base/out_of_range_fraction"]) == 0.0
    assert abs(float(row["mismatch/base/ratio_max"]) - 1.0) < 1e-2
