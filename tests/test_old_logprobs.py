"""The clipped ratio's old policy: with ``model.old_logprobs: trainer`` the policy recomputes the epoch's
logprobs after exploration, so the ratio is exactly 1 on the epoch's first update whatever the engine's
sampling distribution was; with ``rollout`` it is taken against the engine's processed logprobs."""

from __future__ import annotations

import csv

import pytest

from r3l_lightning.cli import cli_main

from test_cli import ROOT, SMOKE

GRPO = ROOT / "configs" / "methods" / "grpo.yaml"


def _first_step(tmp_path, monkeypatch, old_logprobs: str) -> dict:
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(SMOKE), "--config", str(GRPO), "--model.old_logprobs", old_logprobs,
              "--data.explorer.init_args.temperature", "0.5", "--trainer.max_epochs", "1",
              "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback}]",
              "--trainer.enable_checkpointing", "false"])
    (metrics,) = tmp_path.glob("runs/smoke/csv/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert len(rows) == 2  # 2 tasks, one group a step
    return rows[0]


def test_trainer_old_logprobs_make_the_first_ratio_exactly_one(tmp_path, monkeypatch):
    row = _first_step(tmp_path, monkeypatch, "trainer")
    assert float(row["train/ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(row["train/clip_fraction"]) == 0.0
    # the rollout-vs-trainer mismatch is still measured against the engine's logprobs (temperature 0.5)
    assert abs(float(row["mismatch/base/ratio_max"]) - 1.0) > 0.05


def test_rollout_old_logprobs_take_the_engines_distribution(tmp_path, monkeypatch):
    """At temperature 0.5 the engine's processed logprobs are not the policy's: the first update already clips."""
    row = _first_step(tmp_path, monkeypatch, "rollout")
    assert float(row["train/clip_fraction"]) > 0.1  # measured 0.36: a third of the tokens outside [0.8, 1.2]


def test_tis_with_the_clipped_ratio_needs_trainer_old_logprobs():
    from r3l_lightning.mismatch import RolloutCorrection
    from r3l_lightning.models import TINY_RANDOM
    from r3l_lightning.module import R3LModule

    R3LModule(TINY_RANDOM, clip_low=0.2, clip_high=0.2, rollout_correction=RolloutCorrection("tis"))  # decoupled
    with pytest.raises(ValueError, match="old_logprobs=rollout.*twice"):
        R3LModule(TINY_RANDOM, clip_low=0.2, clip_high=0.2, old_logprobs="rollout",
                  rollout_correction=RolloutCorrection("tis"))
