"""Experience buffer, token-budget packing and equal step counts across ranks."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from r3l_lightning.data import ExperienceDataModule, ExperienceDataset, collate, pack, plan_steps
from r3l_lightning.envs.base import Task, TaskSource
from r3l_lightning.mismatch import SAMPLE_KINDS
from r3l_lightning.trajectory import TrainingSample


class ListTasks(TaskSource):
    def __init__(self, n: int) -> None:
        self.tasks = [Task(f"t{i}", {"i": i}) for i in range(n)]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]


def sample(length: int, kind: str = "base", adv: float = 1.0) -> TrainingSample:
    return TrainingSample(list(range(1, length + 1)), [0.0] * (length // 2) + [1.0] * (length - length // 2), adv, kind)


def datamodule(groups_per_step: int = 2, max_tokens: int = 64) -> ExperienceDataModule:
    return ExperienceDataModule(environment=None, train_tasks=ListTasks(10), groups_per_step=groups_per_step,
                                max_tokens_per_micro_batch=max_tokens)


def test_pack_keeps_padded_size_within_budget():
    lengths = [10, 10, 30, 5]
    batches = pack([sample(n) for n in lengths], max_tokens=40)
    assert [[len(s.input_ids) for s in b] for b in batches] == [[10, 10], [30], [5]]
    # a sample longer than the budget gets its own micro-batch
    assert [[len(s.input_ids) for s in b] for b in pack([sample(50), sample(3)], 40)] == [[50], [3]]


def test_collate_right_pads_with_zero_attention_and_zero_loss():
    batch = collate([sample(4, adv=2.0), sample(2, kind="sft_retry", adv=1.0)])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert batch["advantages"].tolist() == [2.0, 1.0]
    assert batch["is_sft"].tolist() == [False, True]


def test_collate_by_hand_whatever_the_default_dtype():
    from r3l_lightning.data import ExperienceBuffer, padding_micro_batch

    rows = [TrainingSample([5, 6, 7], [0, 1, 0.5], 2.0, "base", old_logprobs=[0.0, -0.5, -0.25],
                           num_assistant_tokens=2),
            TrainingSample([8, 9], [0, 1], -1.0, "refinement", num_assistant_tokens=1),  # objective shaped
            TrainingSample([3, 4], [0, 1], 0.0, "sft_success")]
    expected = {
        "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0], [3, 4, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]]),
        "loss_mask": torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),
        "old_logprobs": torch.tensor([[0.0, -0.5, -0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        "has_old_logprobs": torch.tensor([True, False, False]),
        "advantages": torch.tensor([2.0, -1.0, 0.0]),
        "is_sft": torch.tensor([False, False, True]),
        "shaped": torch.tensor([False, True, False]),
        "assistant_tokens": torch.tensor([2.0, 1.0, 0.0]),
        "kind": torch.tensor([SAMPLE_KINDS.index(k) for k in ("base", "refinement", "sft_success")]),
    }
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)  # the micro-batch's dtypes are its own
        batch = collate(rows)
        padding = padding_micro_batch()
    finally:
        torch.set_default_dtype(default)
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
    # the padding micro-batch: one two-token sequence that trains nothing
    assert padding["input_ids"].tolist() == [[0, 0]] and padding["attention_mask"].tolist() == [[1, 1]]
    assert padding["loss_mask"].tolist() == [[0.0, 0.0]] and padding["advantages"].tolist() == [0.0]
    assert padding["loss_mask"].dtype == torch.float32
    # the buffer adds to what it holds and counts samples: 2 + 1 in groups, 1 SFT, then 1 more group of 1
    buffer = ExperienceBuffer()
    buffer.put([rows[:2], rows[2:]], [rows[0]])
    buffer.put([rows[1:2]], [])
    assert len(buffer) == 5
    groups, sft = buffer.drain()
    assert groups == [rows[:2], rows[2:], rows[1:2]] and sft == [rows[0]] and len(buffer) == 0


def test_the_datamodule_defaults_and_its_argument_errors():
    from r3l_lightning.explore.r3l import R3LExplorer
    from r3l_lightning.rollout_log import DEFAULT_ROLLOUT_LOG

    env, tasks, held_out = object(), ListTasks(1), ListTasks(3)  # a single task is enough
    dm = ExperienceDataModule(environment=env, train_tasks=tasks, eval_tasks=held_out)
    assert (dm.environment, dm.train_tasks, dm.eval_tasks, dm.rollout_log) == (env, tasks, held_out,
                                                                               DEFAULT_ROLLOUT_LOG)
    assert (dm.tasks_per_epoch, dm.groups_per_step, dm.max_tokens_per_micro_batch, dm.seed) == (8, 8, 4096, 0)
    assert isinstance(dm.explorer, R3LExplorer)
    explorer = R3LExplorer(group_size=2)
    assert ExperienceDataModule(environment=env, train_tasks=tasks, explorer=explorer).explorer is explorer
    assert ExperienceDataModule(environment=env, train_tasks=tasks, groups_per_step=1).groups_per_step == 1
    with pytest.raises(ValueError) as error:
        ExperienceDataModule(environment=env, train_tasks=tasks, groups_per_step=0)
    assert str(error.value) == "data.groups_per_step must be >= 1, got 0"
    with pytest.raises(ValueError) as error:
        ExperienceDataModule(environment=env, train_tasks=ListTasks(0))
    assert str(error.value) == "data.train_tasks is empty: point it at a task source with at least one task"


def test_eval_task_list_is_the_first_tasks_up_to_the_limit():
    dm = ExperienceDataModule(environment=None, train_tasks=ListTasks(2), eval_tasks=ListTasks(3))
    assert [t.task_id for t in dm.eval_task_list()] == ["t0", "t1", "t2"]
    assert [t.task_id for t in dm.eval_task_list(2)] == ["t0", "t1"]
    assert [t.task_id for t in dm.eval_task_list(10)] == ["t0", "t1", "t2"]
    assert datamodule().eval_task_list() == []  # no evaluation tasks


def test_state_dict_round_trip_and_old_checkpoints():
    from types import SimpleNamespace

    dm = datamodule()
    dm.next_train_tasks(3)
    dm.explorer.calls = 4
    dm.buffer.put([[sample(4), sample(6)]], [])
    steps = dm.take_planned_steps()
    state = dm.state_dict()
    assert state.keys() == {"task_cursor", "epoch", "explorer", "untrained_steps"}
    assert (state["task_cursor"], state["epoch"], state["explorer"]) == (3, 1, {"calls": 4})
    assert state["untrained_steps"] == steps and len(steps) == 1
    resumed = datamodule()
    resumed.load_state_dict(state)
    assert (resumed.task_cursor, resumed._epoch, resumed.explorer.calls) == (3, 1, 4)
    assert resumed.untrained_steps == steps and resumed.planned_steps() == steps  # trains exactly those first
    # a multi-process run saves no untrained steps
    dm.trainer = SimpleNamespace(world_size=2)
    assert dm.state_dict()["untrained_steps"] == []
    # a checkpoint of an older version: no explorer state, no untrained steps; the epoch is planned as usual
    old = datamodule()
    old.load_state_dict({"task_cursor": 5, "epoch": 2})
    assert (old.task_cursor, old._epoch, old.explorer.calls, old.untrained_steps) == (5, 2, 0, [])
    old.buffer.put([[sample(4)]], [])
    assert len(old.planned_steps()) == 1


def test_steps_are_trained_one_by_one_and_epochs_are_counted():
    dm = datamodule(groups_per_step=1)  # one group a step: 3 steps
    dm.buffer.put([[sample(4)], [sample(6)], [sample(8)]], [])
    assert dm.plan_epoch() == 3  # one process by default
    steps = dm.take_planned_steps()
    dm.step_trained()
    assert dm.untrained_steps == steps[1:]
    dm.buffer.put([[sample(4)], [sample(6)]], [])
    assert len(list(ExperienceDataset(dm))) == 2 and dm.untrained_steps == []  # the epoch's steps, all trained
    assert dm.state_dict()["epoch"] == 2
    two = datamodule(groups_per_step=2)
    two.buffer.put([[sample(4)], [sample(6)]], [])
    assert two.plan_epoch() == 1  # two groups a step on one process
    # only SFT samples: one step
    assert len(plan_steps([], [sample(4, kind="sft_success")], 2, 64, random.Random(0))) == 1


def test_a_rank_with_fewer_steps_reports_zero_micro_batches_for_the_missing_ones():
    from r3l_lightning.data import equalize

    calls = []

    def reduce_max(values):  # the other rank: 3 steps of 2, 1 and 1 micro-batches
        calls.append(list(values))
        other = {1: [3], 3: [2, 1, 1]}[len(values)]
        return [max(a, b) for a, b in zip(values, other)]

    one_step = plan_steps([[sample(4)]], [], 1, 64, random.Random(0))
    assert equalize(one_step, reduce_max) == (3, [2, 1, 1])
    assert calls == [[1], [1, 0, 0]]


def test_the_epoch_plan_is_seeded():
    # 6 groups of different lengths, one a step: the same seed gives the same order of steps (1 in 720 by chance)
    def plan():
        dm = datamodule(groups_per_step=1)
        dm.buffer.put([[sample(n)] for n in range(2, 8)], [])
        return [step[0]["input_ids"].shape[1] for step in dm.planned_steps()]

    assert plan() == plan()


def test_the_task_cursor_continues_from_where_it_is():
    dm, fresh = datamodule(), datamodule()
    dm.next_train_tasks(2)
    assert dm.next_train_tasks(3) == fresh.next_train_tasks(5)[2:] and dm.task_cursor == 5


def test_the_loss_rows_follow_the_objective_not_the_kind():
    # the kind's objective unless the explorer set another: a "base" sample trained by SFT, a refinement
    # trained as plain policy gradient
    rows = [sample(3), sample(3, "refinement"), sample(3, "sft_retry"),
            TrainingSample([1, 2, 3], [0, 1, 1], 1.0, "base", objective="sft"),
            TrainingSample([1, 2, 3], [0, 1, 1], 1.0, "refinement", objective="policy")]
    assert [s.objective for s in rows] == ["policy", "shaped", "sft", "sft", "policy"]
    batch = collate(rows)
    assert batch["is_sft"].tolist() == [False, False, True, True, False]
    assert batch["shaped"].tolist() == [False, True, False, False, False]
    assert batch["kind"].tolist() == [SAMPLE_KINDS.index(k) for k in ("base", "refinement", "sft_retry", "base",
                                                                      "refinement")]


def test_unknown_kinds_and_objectives_are_refused_when_the_sample_is_made():
    with pytest.raises(ValueError, match="unknown sample kind 'eval'"):
        sample(3, "eval")
    with pytest.raises(ValueError, match="unknown objective 'rl'; use one of policy, sft, shaped"):
        TrainingSample([1, 2], [0, 1], 1.0, "base", objective="rl")


def test_plan_steps_splits_groups_and_spreads_sft():
    groups = [[sample(4), sample(4)] for _ in range(5)]
    sft = [sample(3, "sft_reflect") for _ in range(4)]
    steps = plan_steps(groups, sft, groups_per_step=2, max_tokens=1000, rng=random.Random(0))
    assert len(steps) == 3
    per_step = [[s for mb in step for s in mb] for step in steps]
    assert [sum(not s.is_sft for s in st) for st in per_step] == [4, 4, 2]
    assert [sum(s.is_sft for s in st) for st in per_step] == [2, 1, 1]


def test_steps_pack_similar_lengths_together():
    """Lengths 10, 30, 10, 30 within 60 padded tokens: in order [10, 30] [10, 30] pad to 60 + 60 = 120 tokens;
    shortest first [10, 10] [30, 30] pad to 20 + 60 = 80 (no padding at all)."""
    (step,) = plan_steps([[sample(n) for n in (10, 30, 10, 30)]], [], 1, 60, random.Random(0))
    assert [[len(s.input_ids) for s in mb] for mb in step] == [[10, 10], [30, 30]]


def test_shuffling_is_seeded():
    groups = [[sample(2 + i)] for i in range(8)]
    a = plan_steps(groups, [], 1, 100, random.Random("0-epoch-0"))
    b = plan_steps(groups, [], 1, 100, random.Random("0-epoch-0"))
    c = plan_steps(groups, [], 1, 100, random.Random("0-epoch-1"))
    order = lambda steps: [len(st[0][0].input_ids) for st in steps]  # noqa: E731
    assert order(a) == order(b) and order(a) != order(c)


def _simulated_ranks(world: int):
    """A thread-based elementwise-max all-reduce between ``world`` simulated ranks."""
    barrier = threading.Barrier(world)
    slots: list[list[int]] = [[] for _ in range(world)]

    def make(rank: int):
        def reduce_max(values: list[int]) -> list[int]:
            slots[rank] = list(values)
            barrier.wait()
            out = [max(col) for col in zip(*slots)]
            barrier.wait()
            return out
        return reduce_max

    return [make(r) for r in range(world)]


def test_two_ranks_with_uneven_buffers_yield_equal_steps_and_forward_passes():
    modules = [datamodule(groups_per_step=4, max_tokens=16), datamodule(groups_per_step=4, max_tokens=16)]
    modules[0].buffer.put([[sample(6), sample(6)] for _ in range(5)], [sample(4, "sft_retry")])
    modules[1].buffer.put([[sample(3)]], [])
    reducers = _simulated_ranks(2)
    counts = [None, None]

    def run(rank: int):
        counts[rank] = modules[rank].plan_epoch(world_size=2, reduce_max=reducers[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    # rank 0: 5 groups, 2 per rank-step -> 3 steps; rank 1: 1 group -> 1 step; both run 3
    assert counts == [3, 3]
    steps = [list(iter(m.train_dataloader())) for m in modules]
    assert len(steps[0]) == len(steps[1]) == 3
    assert [len(s) for s in steps[0]] == [len(s) for s in steps[1]]
    padding = steps[1][1:]  # rank 1 only had one real step
    for step in padding:
        for mb in step:
            assert mb["loss_mask"].sum() == 0
    real_tokens = sum(mb["loss_mask"].sum() for mb in steps[1][0])
    assert real_tokens == 2  # sample(3): mask [0, 1, 1]
    # the buffer was drained: the next epoch starts empty
    assert len(modules[0].buffer) == 0 and list(iter(modules[0].train_dataloader())) == []


def test_task_cursor_shards_by_rank_and_advances_on_every_rank():
    a, b = datamodule(), datamodule()
    r0 = a.next_train_tasks(4, rank=0, world_size=2)
    r1 = b.next_train_tasks(4, rank=1, world_size=2)
    ids = [t.task_id for t in r0 + r1]
    assert len(r0) == len(r1) == 2 and len(set(ids)) == 4
    assert a.task_cursor == b.task_cursor == 4
    # ten tasks: one pass over the shuffled order visits every task once
    c = datamodule()
    first_pass = [t.task_id for t in c.next_train_tasks(10)]
    assert sorted(first_pass) == sorted(f"t{i}" for i in range(10))
    state = c.state_dict()
    d = datamodule()
    d.load_state_dict(state)
    assert [t.task_id for t in d.next_train_tasks(3)] == [t.task_id for t in c.next_train_tasks(3)]


def test_micro_batches_are_tensors_lightning_can_move():
    m = datamodule()
    m.buffer.put([[sample(5)]], [])
    (step,) = list(iter(m.train_dataloader()))
    assert all(isinstance(v, torch.Tensor) for mb in step for v in mb.values())
