"""``GroupExplorer``: N independent samples per task, advantages per group (GRPO-style exploration).

Also "R³L w/o reflect-retry" (``advantage: r3l``), DAPO (dynamic sampling, soft overlong penalty) and
OPMD (``advantage: mean_baseline``; its 1/(1 + τ) is ``model.opmd_tau``).
"""

from __future__ import annotations

from typing import Literal

from r3l_lightning.advantages import AdvantageMode, SingletonRule, group_advantages
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, Explorer, base_stats
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.explore.records import trajectories_record
from r3l_lightning.trajectory import TokenizedConversation, TrainingSample, Trajectory, make_sample

OverlongLength = Literal["longest_response", "after_first_prompt"]


def overlong_penalty(length: int, max_tokens: int, buffer_tokens: int, factor: float) -> float:
    """DAPO's soft overlong punishment (DAPO paper eq. 13; the reference code's ``compute_overlong_penalty``).

    With L_exp = max_tokens − buffer_tokens: 0 if length ≤ L_exp; (L_exp − length)/buffer_tokens · factor
    if L_exp < length ≤ max_tokens (linear from 0 to −factor); −factor beyond max_tokens.
    """
    expected = max_tokens - buffer_tokens
    if length <= expected:
        return 0.0
    if length > max_tokens:
        return -factor
    return (expected - length) / buffer_tokens * factor


class GroupExplorer(Explorer):
    """``group_size`` independent samples per task; advantages per group (GRPO-style exploration).

    ``singleton``: what a group of one gets under ``grpo``/``mean_baseline`` (see ``advantages``).
    ``drop_uniform_groups``: DAPO's dynamic sampling (groups whose rewards are all equal are dropped, not
    resampled). ``overlong_penalty`` (factor; 0 = off), ``overlong_max_tokens`` (None: ``max_new_tokens``),
    ``overlong_buffer_tokens``: DAPO's soft overlong penalty added to the reward, see
    :func:`overlong_penalty`, on the length of the trajectory's longest response (``overlong_length:
    longest_response``) or, as the reference code, on every token after the first prompt, observations
    included (``after_first_prompt``).
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
        drop_uniform_groups: bool = False,
        overlong_penalty: float = 0.0,
        overlong_max_tokens: int | None = None,
        overlong_buffer_tokens: int = 0,
        overlong_length: OverlongLength = "longest_response",
        seed: int = 0,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self.advantage = advantage
        self.alpha = alpha
        self.singleton = singleton
        self.drop_uniform_groups = drop_uniform_groups
        self.overlong_penalty = overlong_penalty
        self.overlong_max_tokens = overlong_max_tokens if overlong_max_tokens is not None else max_new_tokens
        self.overlong_buffer_tokens = overlong_buffer_tokens
        self.overlong_length = overlong_length
        if overlong_penalty and not 0 < overlong_buffer_tokens <= self.overlong_max_tokens:
            raise ValueError(
                f"overlong_penalty needs 0 < overlong_buffer_tokens <= overlong_max_tokens "
                f"({self.overlong_max_tokens}), got overlong_buffer_tokens={overlong_buffer_tokens}"
            )
        if overlong_length not in ("longest_response", "after_first_prompt"):
            raise ValueError(f"overlong_length must be longest_response or after_first_prompt, got {overlong_length!r}")
        self.seed = seed
        self._calls = 0

    def make_group(self, ctx: RolloutContext, trajectories: list[Trajectory], pivots: list[int], group_id: str,
                   counters: RolloutCounters) -> list[TrainingSample]:
        """RL samples of one group, or none when ``drop_uniform_groups`` and all rewards are equal."""
        conversations = [ctx.chat.tokenize(t.messages) for t in trajectories]
        rewards = [t.reward + self._length_penalty(c) for t, c in zip(trajectories, conversations)]
        if self.drop_uniform_groups and len(set(rewards)) <= 1:
            counters.add("groups_dropped")
            return []
        advantages = group_advantages(rewards, mode=self.advantage, alpha=self.alpha, singleton=self.singleton)
        return [
            make_sample(c, a, t.kind, first_trainable_turn=p, group_id=group_id)
            for c, t, a, p in zip(conversations, trajectories, advantages.tolist(), pivots)
        ]

    def _length_penalty(self, conversation: TokenizedConversation) -> float:
        if not self.overlong_penalty or not conversation.turn_spans:
            return 0.0
        if self.overlong_length == "longest_response":
            length = max(end - start for start, end in conversation.turn_spans)
        else:
            length = len(conversation.input_ids) - conversation.turn_spans[0][0]
        return overlong_penalty(length, self.overlong_max_tokens, self.overlong_buffer_tokens, self.overlong_penalty)

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
