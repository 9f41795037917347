"""``RAFTExplorer``: reward-ranked fine-tuning. For every task: roll out N trajectories; each kept one (a success,
or with ``keep: positive_reward`` any reward above 0) becomes an SFT sample; nothing else trains."""

from __future__ import annotations

from typing import Literal

from r3l_lightning.explore.attempt import TaskGroup
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.group import GroupExplorer

RAFTKeep = Literal["success", "positive_reward"]


class RAFTExplorer(GroupExplorer):
    """RAFT: ``group_size`` samples per task; the kept trajectories become SFT samples, nothing else.

    ``keep``: ``success`` (R ≥ 1: the paper, and the reference code on every task but ScienceWorld) or
    ``positive_reward`` (R > 0: the reference code's ScienceWorld RAFT, which keeps partial progress).
    The sampling arguments are :class:`~r3l_lightning.explore.group.GroupExplorer`'s (no advantage: SFT only).
    """

    sample_kinds = ("sft_success",)

    def __init__(self, group_size: int = 8, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                 keep: RAFTKeep = "success", seed: int = 0) -> None:
        super().__init__(group_size, temperature, top_p, max_new_tokens, seed=seed)
        if keep not in ("success", "positive_reward"):
            raise ValueError(f"keep must be 'success' or 'positive_reward', got {keep!r}")
        self.keep = keep

    def kept(self, reward: float) -> bool:
        """Whether a trajectory of this reward becomes an SFT sample."""
        return is_success(reward) if self.keep == "success" else reward > 0

    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size, ctx, counters)
        for group in groups:
            for attempt in group.attempts:
                if self.kept(attempt.base.reward):
                    self.add_sample(ctx, group, attempt, attempt.base.messages, "sft_success",
                                    reward=attempt.base.reward, objective="sft")
