"""``BestOfNExplorer``: best-of-N fine-tuning, the worked example of docs/extending.md.

For every task: roll out N trajectories; the best one (highest reward, then fewest tokens, then the first)
becomes an SFT sample when it is a success; nothing else trains.
"""

from __future__ import annotations

from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.group import GroupExplorer


def response_tokens(attempt: Attempt) -> int:
    """How many tokens the policy sampled in the attempt's base trajectory."""
    return sum(len(m.token_ids or ()) for m in attempt.base.messages if m.role == "assistant")


class BestOfNExplorer(GroupExplorer):
    """``group_size`` samples per task; the best successful one of each task is trained on with SFT.

    The arguments are :class:`~r3l_lightning.explore.group.GroupExplorer`'s (no advantage: SFT only).
    """

    sample_kinds = ("sft_success",)

    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size, ctx, counters)
        for group in groups:
            best = max(group.attempts, key=lambda a: (a.base.reward, -response_tokens(a)))
            if is_success(best.base.reward):
                self.add_sample(ctx, group, best, best.base.messages, "sft_success", reward=best.base.reward,
                                objective="sft")

    def stats(self, groups: list[TaskGroup], counters: RolloutCounters) -> dict[str, float]:
        return {"tasks_with_best": float(sum(bool(g.samples) for g in groups))}
