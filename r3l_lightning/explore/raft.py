"""``RAFTExplorer``: reward-ranked fine-tuning. For every task: roll out N trajectories; each successful one
becomes an SFT sample; nothing else trains."""

from __future__ import annotations

from r3l_lightning.explore.attempt import TaskGroup
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.group import GroupExplorer


class RAFTExplorer(GroupExplorer):
    """RAFT: ``group_size`` samples per task; successful trajectories become SFT samples, nothing else."""

    sample_kinds = ("sft_success",)

    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size, ctx, counters)
        for group in groups:
            for attempt in group.attempts:
                if is_success(attempt.base.reward):
                    self.add_sample(ctx, group, attempt, attempt.base.messages, "sft_success",
                                    reward=attempt.base.reward, objective="sft")
