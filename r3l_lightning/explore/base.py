"""The explorer interface: tasks in, exploration groups (RL samples with advantages) and SFT samples out.

Users swap exploration by subclassing :class:`Explorer` (or one of the built-in explorers) and pointing
``data.explorer`` in the config at their class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from r3l_lightning.envs.base import Task
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.trajectory import TrainingSample


@dataclass
class ExplorationResult:
    """What one exploration phase hands to the DataModule: RL groups, SFT samples and statistics, and
    one rollout record per task for the rollout log (see :mod:`r3l_lightning.explore.records`; an
    explorer that fills none just leaves the log empty)."""

    groups: list[list[TrainingSample]] = field(default_factory=list)
    sft: list[TrainingSample] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


class Explorer(ABC):
    """Produces training data for a batch of tasks with the current policy."""

    @abstractmethod
    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        """Roll out ``tasks`` and return groups of RL samples (one group per task) and SFT samples."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (saved in checkpoints by the DataModule)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


def is_success(reward: float) -> bool:
    return reward >= 1.0


def base_stats(rewards: list[float], counters: RolloutCounters) -> dict[str, float]:
    stats = {k: float(v) for k, v in counters.counts.items()}
    n = max(len(rewards), 1)
    stats["base_reward_mean"] = sum(rewards) / n
    stats["base_success_rate"] = sum(is_success(r) for r in rewards) / n
    return stats
