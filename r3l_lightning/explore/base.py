"""The explorer contract: tasks in, exploration groups (RL samples with advantages) and SFT samples out.

Users swap exploration by subclassing :class:`Explorer` (or one of the built-in explorers) and pointing
``data.explorer`` in the config at their class (docs/extending.md walks through one).

What the base class does, so that a method does not:

- :meth:`Explorer.explore` (not overridden) counts the call (``calls``: the sampling seeds of
  :meth:`Explorer.sampling_params` follow it, and checkpoints keep it), makes one
  :class:`~r3l_lightning.explore.attempt.TaskGroup` per task, runs the method's :meth:`Explorer.explore_groups`
  on them, and assembles the :class:`ExplorationResult`: each task's non-SFT samples as one group (in the
  order they were made), the SFT samples, one rollout record per task and the statistics;
- the statistics (:meth:`Explorer.summary`): the rollout counters (tokens, counted failures), the base
  trajectories' mean reward and success rate, ``samples_<kind>`` for every kind in ``sample_kinds``, then the
  method's own :meth:`Explorer.stats`;
- the aggregation table ``averaged_stats``: which statistics are averaged across ranks; every other one is
  summed (counts, tokens).

What a method writes: ``explore_groups`` (its algorithm: roll out, make attempts, attach samples to them
through ``TaskGroup.add``), and optionally ``stats``, ``sample_kinds`` and ``averaged_stats``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.trajectory import Message, Objective, SampleKind, TrainingSample, make_sample


@dataclass
class ExplorationResult:
    """What one exploration phase hands to the DataModule: RL groups, SFT samples and statistics, and
    one rollout record per task for the rollout log (see :mod:`r3l_lightning.explore.records`; an
    explorer that fills none just leaves the log empty)."""

    groups: list[list[TrainingSample]] = field(default_factory=list)
    sft: list[TrainingSample] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def is_success(reward: float) -> bool:
    return reward >= 1.0


def signal_stats(groups: list[TaskGroup]) -> dict[str, float]:
    """How much RL signal the groups carry: ``frac_reward_zero_std``, the fraction of groups whose RL samples all
    have the same reward (no contrast; TRL's ``frac_reward_zero_std``), and ``frac_nonzero_advantage``, the
    fraction of RL samples whose advantage is not 0 (the others train nothing)."""
    rl = [[s for s in g.samples if s.objective != "sft"] for g in groups]
    rl = [samples for samples in rl if samples]
    rewards = [{s.reward for s in samples} for samples in rl]
    flat = [s for samples in rl for s in samples]
    return {
        "frac_reward_zero_std": sum(len(r) <= 1 for r in rewards) / len(rl) if rl else 0.0,
        "frac_nonzero_advantage": sum(s.advantage != 0 for s in flat) / len(flat) if flat else 0.0,
    }


class Explorer(ABC):
    """Produces training data for a batch of tasks with the current policy (the contract: module docstring).

    ``seed``: the sampling seeds of every call are derived from it and the call number.
    """

    sample_kinds: ClassVar[tuple[SampleKind, ...]] = ("base",)  # the samples_<kind> counts in the stats
    averaged_stats: ClassVar[frozenset[str]] = frozenset({"base_reward_mean", "base_success_rate",
                                                          "frac_reward_zero_std", "frac_nonzero_advantage"})

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.calls = 0

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        """Roll out ``tasks`` and return groups of RL samples (one group per task) and SFT samples."""
        self.calls += 1
        counters = RolloutCounters()
        groups = [TaskGroup(task) for task in tasks]
        self.explore_groups(groups, ctx, counters)
        result = ExplorationResult(stats=self.summary(groups, counters), records=[g.to_record() for g in groups])
        for group in groups:
            rl = [s for s in group.samples if not s.is_sft]
            if rl:
                result.groups.append(rl)
            result.sft += [s for s in group.samples if s.is_sft]
        return result

    @abstractmethod
    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        """The method: fill every group's attempts and attach the samples made from them (``TaskGroup.add``)."""

    def stats(self, groups: list[TaskGroup], counters: RolloutCounters) -> dict[str, float]:
        """The method's own statistics (added to :meth:`summary`'s)."""
        return {}

    def summary(self, groups: list[TaskGroup], counters: RolloutCounters) -> dict[str, float]:
        """Counters, base-trajectory reward and success rate, sample counts per kind, then :meth:`stats`."""
        stats = {k: float(v) for k, v in counters.counts.items()}
        rewards = [a.base.reward for g in groups for a in g.attempts]
        n = max(len(rewards), 1)
        stats["base_reward_mean"] = sum(rewards) / n
        stats["base_success_rate"] = sum(is_success(r) for r in rewards) / n
        stats.update(signal_stats(groups))
        kinds = Counter(s.kind for g in groups for s in g.samples)
        stats.update({f"samples_{kind}": float(kinds[kind]) for kind in self.sample_kinds})
        stats.update(self.stats(groups, counters))
        return stats

    def sampling_params(self, params: SamplingParams, offset: int = 0) -> SamplingParams:
        """``params`` with this call's seed (``seed + 1000 · calls + offset``: one offset per phase)."""
        return SamplingParams(params.temperature, params.top_p, params.max_new_tokens, 1,
                              self.seed + 1000 * self.calls + offset)

    def add_sample(self, ctx: RolloutContext, group: TaskGroup, attempt: Attempt, messages: list[Message],
                   kind: SampleKind, advantage: float = 1.0, first_trainable_turn: int = 0,
                   reward: float | None = None, objective: Objective | None = None) -> TrainingSample:
        """A sample of ``messages`` (assistant turns from ``first_trainable_turn`` on trained), attached to
        ``attempt`` in ``group``; ``objective`` None: the kind's."""
        sample = make_sample(ctx.chat.tokenize(messages), advantage, kind, first_trainable_turn, group.task.task_id,
                             reward, objective)
        return group.add(attempt, sample)

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (saved in checkpoints by the DataModule)."""
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.calls = state.get("calls", 0)
