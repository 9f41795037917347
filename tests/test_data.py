"""Experience buffer, token-budget packing and equal step counts across ranks."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from r3l_lightning.data import ExperienceDataModule, collate, pack, plan_steps
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
