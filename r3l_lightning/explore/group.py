"""``GroupExplorer``: N independent samples per task, advantages per group (GRPO-style exploration).

Also "R³L w/o reflect-retry" (``advantage: r3l``), DAPO (dynamic sampling, overlong penalty) and OPMD
(``advantage: mean_baseline``, ``advantage_scale``).
"""

from __future__ import annotations

from r3l_lightning.advantages import AdvantageMode, group_advantages
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, Explorer, base_stats
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.explore.records import trajectories_record
from r3l_lightning.trajectory import TrainingSample, Trajectory, make_sample


class GroupExplorer(Explorer):
    """``group_size`` independent samples per task; advantages per group (GRPO-style exploration)."""

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "grpo",
        alpha: float = 3.0,
        advantage_scale: float = 1.0,
        drop_uniform_groups: bool = False,
        overlong_penalty: float = 0.0,
        seed: int = 0,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.advantage = advantage
        self.alpha = alpha
        self.advantage_scale = advantage_scale
        self.drop_uniform_groups = drop_uniform_groups
        self.overlong_penalty = overlong_penalty
        self.seed = seed
        self._calls = 0

    def make_group(self, ctx: RolloutContext, trajectories: list[Trajectory], pivots: list[int], group_id: str,
                   counters: RolloutCounters) -> list[TrainingSample]:
        """RL samples of one group, or none when ``drop_uniform_groups`` and all rewards are equal."""
        rewards = [t.reward - (self.overlong_penalty if t.info.get("truncated") else 0.0) for t in trajectories]
        if self.drop_uniform_groups and len(set(rewards)) <= 1:
            counters.add("groups_dropped")
            return []
        advantages = group_advantages(rewards, mode=self.advantage, alpha=self.alpha) * self.advantage_scale
        return [
            make_sample(ctx.chat.tokenize(t.messages), a, t.kind, first_trainable_turn=p, group_id=group_id)
            for t, a, p in zip(trajectories, advantages.tolist(), pivots)
        ]

    def state_dict(self) -> dict:
        return {"calls": self._calls}

    def load_state_dict(self, state: dict) -> None:
        self._calls = state.get("calls", 0)

    def _params(self, base: SamplingParams, offset: int = 0) -> SamplingParams:
        """Sampling params with a fresh seed per call (reproducible from ``seed``)."""
        return SamplingParams(base.temperature, base.top_p, base.max_new_tokens, 1, self.seed + 1000 * self._calls + offset)

    def rollout(self, tasks: list[Task], per_task: int, ctx: RolloutContext, counters: RolloutCounters) -> list[list[Trajectory]]:
        """``per_task`` base trajectories for every task, all stepped together."""
        states = [start_episode(ctx, task, counters) for task in tasks for _ in range(per_task)]
        run_episodes(ctx, states, self._params(self.sampling), counters, "tokens_base")
        return [[s.trajectory for s in states[i * per_task : (i + 1) * per_task]] for i in range(len(tasks))]

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        groups = self.rollout(tasks, self.group_size, ctx, counters)
        result = ExplorationResult()
        for task, group in zip(tasks, groups):
            samples = self.make_group(ctx, group, [0] * len(group), task.task_id, counters)
            if samples:
                result.groups.append(samples)
            result.records.append(trajectories_record(task, group, samples))
        rewards = [t.reward for g in groups for t in g]
        result.stats = base_stats(rewards, counters)
        result.stats["samples_base"] = float(len(rewards))
        return result
