"""``GroupExplorer``: N independent samples per task, advantages per group (GRPO-style exploration).

Also "R³L w/o reflect-retry" (``advantage: r3l``) and OPMD (``advantage: mean_baseline``; its 1/(1 + τ) is
``model.loss.opmd_tau``). For every task:

1. roll out N trajectories from the task's prompt (:meth:`GroupExplorer.rollout`, all tasks stepped together);
2. one group of N samples, advantages from the N rewards (:meth:`GroupExplorer.make_group`).
"""

from __future__ import annotations

from dataclasses import dataclass

from r3l_lightning.advantages import AdvantageMode, SingletonRule, group_advantages
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.base import Explorer
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.trajectory import Objective, SampleKind, TokenizedConversation, TrainingSample, Trajectory, make_sample


@dataclass
class Candidate:
    """A trajectory to train on in a group: the attempt it belongs to, its sample kind, its first trainable
    turn, the reward its advantage is computed from (None: the trajectory's) and its objective (None: the
    kind's, see :data:`~r3l_lightning.trajectory.SAMPLE_KINDS`)."""

    attempt: Attempt
    trajectory: Trajectory
    kind: SampleKind = "base"
    first_trainable_turn: int = 0
    reward: float | None = None
    objective: Objective | None = None

    @property
    def group_reward(self) -> float:
        return self.trajectory.reward if self.reward is None else self.reward


class GroupExplorer(Explorer):
    """``group_size`` independent samples per task; advantages per group (GRPO-style exploration).

    ``advantage``, ``alpha``, ``singleton``: the group advantage (see :mod:`r3l_lightning.advantages`;
    ``singleton``: what a group of one gets under ``grpo``/``mean_baseline``).
    """

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "grpo",
        alpha: float = 3.0,
        singleton: SingletonRule = "no_signal",
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.advantage = advantage
        self.alpha = alpha
        self.singleton = singleton

    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size, ctx, counters)
        for group in groups:
            self.make_group(ctx, group, [Candidate(a, a.base) for a in group.attempts], counters)

    def rollout(self, groups: list[TaskGroup], per_task: int, ctx: RolloutContext, counters: RolloutCounters) -> None:
        """``per_task`` base trajectories for every group's task, all stepped together: one attempt each."""
        states = [start_episode(ctx, group.task, counters) for group in groups for _ in range(per_task)]
        run_episodes(ctx, states, self.sampling_params(self.sampling), counters, "tokens_base")
        for i, group in enumerate(groups):
            group.attempts += [Attempt(group.task, s.trajectory) for s in states[i * per_task : (i + 1) * per_task]]

    def make_group(self, ctx: RolloutContext, group: TaskGroup, candidates: list[Candidate],
                   counters: RolloutCounters) -> list[TrainingSample]:
        """One group of RL samples with advantages from the candidates' rewards (:meth:`shaped_reward`),
        attached to their attempts; none when :meth:`keeps` rejects the rewards."""
        conversations = [ctx.chat.tokenize(c.trajectory.messages) for c in candidates]
        rewards = [self.shaped_reward(c.group_reward, conversation) for c, conversation in zip(candidates, conversations)]
        if not self.keeps(rewards, counters):
            return []
        advantages = group_advantages(rewards, mode=self.advantage, alpha=self.alpha, singleton=self.singleton)
        return [
            group.add(c.attempt, make_sample(conversation, advantage, c.kind, c.first_trainable_turn,
                                             group.task.task_id, c.group_reward, c.objective))
            for c, conversation, advantage in zip(candidates, conversations, advantages.tolist())
        ]

    def shaped_reward(self, reward: float, conversation: TokenizedConversation) -> float:
        """The reward a group's advantages are computed from (DAPO adds its length penalty here)."""
        return reward

    def keeps(self, rewards: list[float], counters: RolloutCounters) -> bool:
        """Whether a group with these rewards trains (DAPO drops uniform ones)."""
        return True
