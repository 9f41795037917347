"""EvalCallback: the paired before/after gain and its standard error, worked out by hand."""

from __future__ import annotations

import math

import pytest

from r3l_lightning.callbacks.evaluation import _in_task_order, paired_gain


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
    from types import SimpleNamespace

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
