"""EvalCallback: the paired before/after gain and its standard error, worked out by hand; its phase timings."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from r3l_lightning.callbacks.evaluation import EvalCallback, _in_task_order, describe, paired_gain
from r3l_lightning.callbacks.exploration import timed_sync
from r3l_lightning.data import ExperienceDataModule
from scripted import GuessEnv, GuessTasks, ScriptedEngine


def test_paired_gain_by_hand():
    # differences [1, 0, 0, 1]: mean .5; unbiased variance (4 · .25)/3 = 1/3; SE = sqrt(1/3 / 4) = sqrt(1/12)
    gain, se = paired_gain([0, 0, 1, 0], [1, 0, 1, 1])
    assert gain == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(1 / 12))
    # avg@2 per task: [.5, 0] -> [1, .5]: differences [.5, .5], no spread, SE 0
    assert paired_gain([0.5, 0.0], [1.0, 0.5]) == pytest.approx((0.5, 0.0))
    assert paired_gain([1.0], [0.0]) == (-1.0, 0.0)  # one task: no standard error


def test_paired_gain_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="equally long"):
        paired_gain([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_gain([], [])


def test_single_process_task_order_is_kept():
    assert _in_task_order([0.5, 1.0, 0.0], rank=0, world_size=1) == [0.5, 1.0, 0.0]


def test_rollout_token_budget_stops_after_the_epoch_that_reaches_it():
    from r3l_lightning.callbacks import ExplorationCallback, RolloutTokenBudget

    exploration = ExplorationCallback(show_progress=False)
    trainer = SimpleNamespace(callbacks=[exploration], loggers=[], global_step=0, should_stop=False)
    budget = RolloutTokenBudget(max_tokens=100)
    # 30 base + 20 reflection + 10 retry tokens per epoch; eval and other counters do not count
    exploration.last_stats = {"tokens_base": 30.0, "tokens_reflection": 20.0, "tokens_retry": 10.0, "tokens_eval": 99.0}
    budget.on_train_epoch_end(trainer, None)
    assert (budget.spent, trainer.should_stop) == (60, False)
    budget.on_train_epoch_end(trainer, None)
    assert (budget.spent, trainer.should_stop) == (120, True)
    assert budget.state_dict() == {"spent": 120}
    with pytest.raises(ValueError, match="ExplorationCallback"):
        budget.on_train_epoch_end(SimpleNamespace(callbacks=[], loggers=[], global_step=0), None)
    with pytest.raises(ValueError, match="max_tokens"):
        RolloutTokenBudget(0)


class FakeClock:
    """``time.perf_counter`` stand-in that only the engine below moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eval_time_excludes_engine_start_up_and_weight_sync(monkeypatch, tiny_chat):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)

    class StartingEngine(ScriptedEngine):
        """Starts in 30 s on its first sync, syncs weights in 2 s later; every generate call takes 5 s."""

        starts = 0

        def sync_weights(self) -> None:
            clock.now += 2.0 if self.starts else 30.0
            self.starts = 1

        def generate(self, prompts, params, constraints=None):
            clock.now += 5.0
            return super().generate(prompts, params, constraints)

    engine = StartingEngine(lambda prompt: "apple", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    datamodule = ExperienceDataModule(GuessEnv(max_turns=1), GuessTasks(4), eval_tasks=GuessTasks(3))
    module = SimpleNamespace(rollout_engine=engine, chat=tiny_chat, device=torch.device("cpu"), _trainer=None)
    callback = EvalCallback(show_progress=False)
    first = callback.run(datamodule, module)
    assert engine.calls == [3]  # the three tasks in one generate call: 5 s of rollouts
    assert (first["eval/time_s"], first["eval/engine_start_s"], first["eval/success_rate"]) == (5.0, 30.0, 1.0)
    assert "eval/weight_sync_s" not in first
    assert describe("before training", first).endswith("(3 rollouts, 5s; engine start-up 30s)")
    second = callback.run(datamodule, module)
    assert (second["eval/time_s"], second["eval/weight_sync_s"]) == (5.0, 2.0) and "eval/engine_start_s" not in second
    assert describe("after training", second).endswith("(3 rollouts, 5s; weight sync 2s)")


def test_timed_sync_of_an_engine_that_samples_the_policy(tiny_chat):
    engine = ScriptedEngine(lambda prompt: "", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)  # no `starts`
    (key,) = timed_sync(engine)
    assert key == "weight_sync_s"
