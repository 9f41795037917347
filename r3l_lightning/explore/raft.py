"""``RAFTExplorer``: reward-ranked fine-tuning — successful samples become SFT data, nothing else."""

from __future__ import annotations

from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, base_stats, is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.group import GroupExplorer
from r3l_lightning.explore.records import trajectories_record
from r3l_lightning.trajectory import make_sample


class RAFTExplorer(GroupExplorer):
    """RAFT: ``group_size`` samples per task; successful trajectories become SFT samples, nothing else."""

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        groups = self.rollout(tasks, self.group_size, ctx, counters)
        result = ExplorationResult()
        for task, group in zip(tasks, groups):
            sft = [make_sample(ctx.chat.tokenize(t.messages), 1.0, "sft_success", 0, t.task_id)
                   if is_success(t.reward) else None for t in group]
            result.sft += [s for s in sft if s is not None]
            result.records.append(trajectories_record(task, group, sft))
        result.stats = base_stats([t.reward for group in groups for t in group], counters)
        result.stats["samples_sft_success"] = float(len(result.sft))
        return result
