"""The clipped ratio's old policy: with ``model.loss.old_logprobs: trainer`` the policy recomputes the epoch's
logprobs after exploration, so the ratio is exactly 1 on the epoch's first update whatever the engine's
sampling distribution was; with ``rollout`` it is taken against the engine's processed logprobs."""

from __future__ import annotations

import csv

import lightning as L
import pytest

from r3l_lightning.cli import cli_main
from r3l_lightning.models import decoder_layers

from test_cli import ROOT, SMOKE

GRPO = ROOT / "configs" / "methods" / "grpo.yaml"


def _first_step(tmp_path, monkeypatch, old_logprobs: str) -> dict:
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(SMOKE), "--config", str(GRPO), "--model.loss.old_logprobs", old_logprobs,
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
    from dataclasses import replace

    from r3l_lightning.losses import LossConfig
    from r3l_lightning.mismatch import RolloutCorrection
    from r3l_lightning.models import TINY_RANDOM
    from r3l_lightning.module import R3LModule

    clip = LossConfig(clip_low=0.2, clip_high=0.2)
    R3LModule(TINY_RANDOM, loss=clip, rollout_correction=RolloutCorrection("tis"))  # decoupled
    with pytest.raises(ValueError, match="old_logprobs=rollout.*twice"):
        R3LModule(TINY_RANDOM, loss=replace(clip, old_logprobs="rollout"), rollout_correction=RolloutCorrection("tis"))


class PolicyForwards(L.Callback):
    """Counts the policy's forward passes from the end of exploration to the end of each epoch, and the
    epoch's planned micro-batches (registered after ExplorationCallback: its epoch-start hook runs after
    exploration and before the module's)."""

    def __init__(self) -> None:
        self.forwards, self.micro_batches, self.first_step = [], [], []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        steps = trainer.datamodule.planned_steps()
        self.micro_batches.append(sum(len(s) for s in steps))
        self.first_step.append(len(steps[0]))
        self.forwards.append(0)
        first_layer = decoder_layers(pl_module.policy)[0]  # every forward, whether or not it computes full logits
        self._hook = first_layer.register_forward_pre_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.forwards[-1] += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._hook.remove()


@pytest.mark.parametrize("method", ["r3l", "grpo"])
def test_policy_forwards_per_epoch(tmp_path, monkeypatch, method):
    """R³L: one forward per trained micro-batch (no reference model, no old-logprob pass). GRPO (trainer old
    logprobs): one more for every micro-batch after the first step; its KL reference is a separate model."""
    monkeypatch.chdir(tmp_path)
    overlay = ["--config", str(GRPO)] if method == "grpo" else []
    cli = cli_main(["fit", "--config", str(SMOKE), *overlay, "--trainer.max_epochs", "1",
                    "--data.tasks_per_epoch", "3", "--data.max_tokens_per_micro_batch", "256",
                    "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback}]",
                    "--trainer.callbacks+", "test_old_logprobs.PolicyForwards",
                    "--trainer.enable_checkpointing", "false"])
    (counter,) = [c for c in cli.trainer.callbacks if isinstance(c, PolicyForwards)]
    (micro,), (first,), (forwards,) = counter.micro_batches, counter.first_step, counter.forwards
    assert micro > first  # several steps, several micro-batches (256-token micro-batches)
    assert forwards == (micro if method == "r3l" else 2 * micro - first)
