"""Explorers turn a batch of tasks into exploration groups (RL samples with advantages) and SFT samples.

- :class:`GroupExplorer`: N samples per task from the current policy (GRPO and "R³L w/o reflect-retry").
- :class:`R3LExplorer`: N/2 base samples, reflection on each, retry from the pivot with guidance,
  distill samples (guidance removed), pivot masks, SFT samples from verified corrections.
- :class:`CritiqueGRPOExplorer`: N samples, a critique (reflection) of each, a critique-guided
  refinement from scratch, the best refinement added to the group without its critique.

Users swap exploration by subclassing :class:`Explorer` and pointing the config at their class.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from r3l_lightning.advantages import AdvantageMode, group_advantages
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.episodes import (
    EpisodeState,
    RolloutContext,
    RolloutCounters,
    run_episodes,
    start_episode,
)
from r3l_lightning.explore.reflection import (
    Reflection,
    guidance_text,
    parse_reflection,
    reflection_messages,
)
from r3l_lightning.trajectory import Message, SampleKind, TrainingSample, Trajectory, make_sample

log = logging.getLogger(__name__)


@dataclass
class ExplorationResult:
    """What one exploration phase hands to the DataModule: RL groups, SFT samples and statistics."""

    groups: list[list[TrainingSample]] = field(default_factory=list)
    sft: list[TrainingSample] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


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
        rewards = [t.reward for g in groups for t in g]
        result.stats = base_stats(rewards, counters)
        result.stats["samples_base"] = float(len(rewards))
        return result


class RAFTExplorer(GroupExplorer):
    """RAFT: ``group_size`` samples per task; successful trajectories become SFT samples, nothing else."""

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        trajectories = [t for group in self.rollout(tasks, self.group_size, ctx, counters) for t in group]
        result = ExplorationResult()
        result.sft = [make_sample(ctx.chat.tokenize(t.messages), 1.0, "sft_success", 0, t.task_id)
                      for t in trajectories if is_success(t.reward)]
        result.stats = base_stats([t.reward for t in trajectories], counters)
        result.stats["samples_sft_success"] = float(len(result.sft))
        return result


def base_stats(rewards: list[float], counters: RolloutCounters) -> dict[str, float]:
    stats = {k: float(v) for k, v in counters.counts.items()}
    n = max(len(rewards), 1)
    stats["base_reward_mean"] = sum(rewards) / n
    stats["base_success_rate"] = sum(is_success(r) for r in rewards) / n
    return stats


@dataclass
class _Pair:
    """A base trajectory, its reflection, and (when triggered) its retry."""

    task: Task
    base: Trajectory
    reflection_messages: list[Message]
    reflection_response: Message | None = None
    reflection: Reflection | None = None
    retry: Trajectory | None = None
    pivot: int = 0


class R3LExplorer(GroupExplorer):
    """Reflect-then-retry exploration (R³L, spec section 1).

    Per task: ``group_size // 2`` base trajectories; a reflection on each; a retry from the pivot with
    guidance when the reflection is valid, not ``success`` and the pivot is in range; the group is
    base ∪ distill. ``sft_rule``: ``paper`` admits a correction when R' > R, ``reference`` also
    requires R' >= 1, ``none`` keeps no SFT data. ``keep_success_reflections`` (reference variant)
    keeps ``success`` reflections of successful base trajectories as SFT samples.

    Reflect-GRPO is this explorer with ``reflect_on="failures"``, ``retry_from_scratch=True`` (the
    guidance goes into the system prompt, pivot 0), ``distill=False`` (the guided retry itself is the
    RL sample), ``pivotal_credit=False`` and ``sft_rule="none"``.
    """

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "r3l",
        alpha: float = 3.0,
        reflection_temperature: float = 0.7,
        reflection_max_new_tokens: int = 512,
        retries_per_base: int = 1,
        pivotal_credit: bool = True,
        sft_rule: Literal["paper", "reference", "none"] = "paper",
        keep_success_reflections: bool = False,
        reflect_on: Literal["all", "failures"] = "all",
        retry_from_scratch: bool = False,
        distill: bool = True,
        advantage_scale: float = 1.0,
        drop_uniform_groups: bool = False,
        overlong_penalty: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(group_size, temperature, top_p, max_new_tokens, advantage, alpha, advantage_scale,
                         drop_uniform_groups, overlong_penalty, seed)
        if group_size < 2:
            raise ValueError(f"R3LExplorer needs group_size >= 2 (N/2 base + N/2 retries), got {group_size}")
        self.reflection_sampling = SamplingParams(reflection_temperature, top_p, reflection_max_new_tokens)
        self.retries_per_base = retries_per_base
        self.pivotal_credit = pivotal_credit
        self.sft_rule = sft_rule
        self.keep_success_reflections = keep_success_reflections
        self.reflect_on = reflect_on
        self.retry_from_scratch = retry_from_scratch
        self.distill = distill

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        per_task = self.group_size // 2
        pairs = self._reflect_and_retry(tasks, per_task, ctx, counters)
        result = ExplorationResult()
        for i, task in enumerate(tasks):
            task_pairs = pairs[i * per_task : (i + 1) * per_task]
            trajectories, pivots = [], []
            for pair in task_pairs:
                pivot = pair.pivot if (pair.retry is not None and self.pivotal_credit) else 0
                trajectories.append(pair.base)
                pivots.append(pivot)
                if pair.retry is not None:
                    trajectories.append(self._distill(pair) if self.distill else self._guided(pair))
                    pivots.append(pivot)
            samples = self.make_group(ctx, trajectories, pivots, task.task_id, counters)
            if samples:
                result.groups.append(samples)
            result.sft += self._sft_samples(task_pairs, ctx, task.task_id)
        result.stats = self._stats(pairs, result, counters)
        return result

    def _reflect_and_retry(self, tasks: list[Task], per_task: int, ctx: RolloutContext,
                           counters: RolloutCounters) -> list[_Pair]:
        """``per_task`` base trajectories of every task (task-major), a reflection on each, their retries."""
        base_groups = self.rollout(tasks, per_task, ctx, counters)
        pairs = [
            _Pair(task, t, reflection_messages(t, ctx.env.system_prompt()))
            for task, group in zip(tasks, base_groups)
            for t in group
        ]
        self._reflect(pairs, ctx, counters)
        self._retry(pairs, ctx, counters)
        return pairs

    def _reflect(self, pairs: list[_Pair], ctx: RolloutContext, counters: RolloutCounters) -> None:
        if self.reflect_on == "failures":
            pairs = [p for p in pairs if not is_success(p.base.reward)]
        if not pairs:
            return
        prompts = [ctx.chat.prompt_ids(p.reflection_messages) for p in pairs]
        outputs = ctx.engine.generate(prompts, self._params(self.reflection_sampling, 1))
        if ctx.progress is not None:
            ctx.progress(len(prompts))
        for pair, (completion,) in zip(pairs, outputs):
            counters.add("tokens_reflection", len(completion.token_ids))
            pair.reflection_response = ctx.chat.assistant_message(completion.token_ids, completion.logprobs)
            reflection, reason = parse_reflection(pair.reflection_response.content, pair.base.num_turns)
            if reflection is None:
                counters.add("invalid_reflections")
                counters.add(f"invalid_reflection_{reason}")
                log.debug("invalid reflection (%s): %.200s", reason, pair.reflection_response.content)
            pair.reflection = reflection

    def _retry(self, pairs: list[_Pair], ctx: RolloutContext, counters: RolloutCounters) -> None:
        attempts: list[tuple[_Pair, EpisodeState]] = []
        for pair in pairs:
            if not self._triggers_retry(pair):
                continue
            counters.add("retries_triggered")
            for _ in range(self.retries_per_base):
                state = self._restore(pair, ctx, counters)
                if state is None:
                    break
                attempts.append((pair, state))
        run_episodes(ctx, [s for _, s in attempts], self._params(self.sampling, 2), counters, "tokens_retry")
        for pair, state in attempts:  # keep the best retry of each pair (first on ties)
            if pair.retry is None or state.trajectory.reward > pair.retry.reward:
                pair.retry = state.trajectory
                pair.pivot = self._pivot(pair)

    def _triggers_retry(self, pair: _Pair) -> bool:
        """A valid reflection that asks for a retry, of an episode the environment did not crash in."""
        return pair.reflection is not None and pair.reflection.wants_retry and not pair.base.info.get("error")

    def _pivot(self, pair: _Pair) -> int:
        """The turn a retry starts from: the reflection's pivot, or 0 when retrying from scratch."""
        return 0 if self.retry_from_scratch else pair.reflection.retry_from_step

    def _restore(self, pair: _Pair, ctx: RolloutContext, counters: RolloutCounters) -> EpisodeState | None:
        """A new episode restored to the pivot turn, with guidance inserted; None on replay mismatch."""
        k = self._pivot(pair)
        base = pair.base
        state = start_episode(ctx, pair.task, counters, kind="sft_retry")
        if state.done:
            return None
        try:
            restored = state.episode.restore(base.actions[:k], base.observations[: k + 1])
        except Exception as err:  # noqa: BLE001 - an env crash costs the retry, not the run
            log.warning("restore failed for %s: %r", base.task_id, err)
            restored = False
        if not restored:
            counters.add("replay_mismatches")
            state.episode.close()
            return None
        guidance = guidance_text(pair.reflection)
        prefix = _prefix_messages(base, k)
        if k == 0:
            system = prefix[0]
            prefix[0] = Message("system", f"{system.content}\n\n{guidance}", guidance=True)
            messages = prefix
        else:
            messages = prefix[:-1] + [Message("system", guidance, guidance=True), prefix[-1]]
        state.trajectory.messages = messages
        state.trajectory.actions = list(base.actions[:k])
        state.trajectory.observations = list(base.observations[: k + 1])
        state.turns = k
        return state

    def _distill(self, pair: _Pair, kind: SampleKind = "distill") -> Trajectory:
        """ORIGINAL prefix (no guidance) + the retry's suffix: what the model must learn unaided."""
        retry = pair.retry
        prefix = _prefix_messages(pair.base, pair.pivot)
        suffix = retry.messages[len(prefix) + (0 if pair.pivot == 0 else 1) :]
        distill = copy.copy(retry)
        distill.messages = prefix + suffix
        distill.kind = kind
        return distill

    def _guided(self, pair: _Pair) -> Trajectory:
        """The retry as generated, guidance in the context, as an RL sample (Reflect-GRPO)."""
        guided = copy.copy(pair.retry)
        guided.kind = "retry"
        return guided

    def _admits(self, pair: _Pair) -> bool:
        if self.sft_rule == "none" or pair.retry is None or not pair.retry.reward > pair.base.reward:
            return False
        return self.sft_rule == "paper" or is_success(pair.retry.reward)

    def _sft_samples(self, pairs: list[_Pair], ctx: RolloutContext, group_id: str) -> list[TrainingSample]:
        samples = []
        for pair in pairs:
            if pair.reflection_response is None:
                continue
            reflection_sample = pair.reflection_messages + [pair.reflection_response]
            if self._admits(pair):
                samples.append(make_sample(ctx.chat.tokenize(reflection_sample), 1.0, "sft_reflect", 0, group_id))
                samples.append(
                    make_sample(ctx.chat.tokenize(pair.retry.messages), 1.0, "sft_retry", pair.pivot, group_id)
                )
            elif (
                self.keep_success_reflections
                and pair.reflection is not None
                and pair.reflection.outcome == "success"
                and is_success(pair.base.reward)
            ):
                samples.append(make_sample(ctx.chat.tokenize(reflection_sample), 1.0, "sft_reflect", 0, group_id))
        return samples

    def _stats(self, pairs: list[_Pair], result: ExplorationResult, counters: RolloutCounters) -> dict[str, float]:
        stats = base_stats([p.base.reward for p in pairs], counters)
        n = max(len(pairs), 1)
        retried = [p for p in pairs if p.retry is not None]
        reflected = [p for p in pairs if p.reflection_response is not None]
        stats["valid_reflection_rate"] = sum(p.reflection is not None for p in reflected) / max(len(reflected), 1)
        stats["retry_trigger_rate"] = counters.counts["retries_triggered"] / n
        stats["retry_improvement_rate"] = (
            sum(p.retry.reward > p.base.reward for p in retried) / len(retried) if retried else 0.0
        )
        stats["mean_pivot"] = sum(p.pivot for p in retried) / len(retried) if retried else 0.0
        kinds = [s.kind for g in result.groups for s in g] + [s.kind for s in result.sft]
        for kind in ("base", "distill", "retry", "sft_reflect", "sft_retry"):
            stats[f"samples_{kind}"] = float(kinds.count(kind))
        return stats


class CritiqueGRPOExplorer(R3LExplorer):
    """Critique-GRPO exploration (Zhang et al. 2025, arXiv 2506.03106) with the policy as its own critic.

    Per task: ``group_size`` samples from scratch; a critique of each — the policy's reflection on the
    finished trajectory (an invalid one is counted and skips that refinement); for every valid critique a
    refinement from scratch with the critique in the system prompt (R³L's retry with pivot 0). The best
    refinement of the task (highest reward, the first on ties) joins the group as a ``refinement``
    sample whose context is the ORIGINAL prompt, critique removed. Advantages over the N + 1 rewards
    (GRPO's by default), every assistant turn trainable, no SFT data. The module trains refinement tokens
    with policy shaping instead of the importance ratio (``model.shaping_gamma``).
    """

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "grpo",
        reflection_temperature: float = 0.7,
        reflection_max_new_tokens: int = 512,
        advantage_scale: float = 1.0,
        drop_uniform_groups: bool = False,
        overlong_penalty: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            group_size=group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            advantage=advantage, reflection_temperature=reflection_temperature,
            reflection_max_new_tokens=reflection_max_new_tokens, pivotal_credit=False, sft_rule="none",
            reflect_on="all", retry_from_scratch=True, advantage_scale=advantage_scale,
            drop_uniform_groups=drop_uniform_groups, overlong_penalty=overlong_penalty, seed=seed,
        )

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        pairs = self._reflect_and_retry(tasks, self.group_size, ctx, counters)
        result = ExplorationResult()
        for i, task in enumerate(tasks):
            task_pairs = pairs[i * self.group_size : (i + 1) * self.group_size]
            trajectories = [p.base for p in task_pairs]
            refined = [p for p in task_pairs if p.retry is not None]
            if refined:
                best = max(refined, key=lambda p: p.retry.reward)  # max keeps the first of equal rewards
                trajectories.append(self._distill(best, kind="refinement"))
            samples = self.make_group(ctx, trajectories, [0] * len(trajectories), task.task_id, counters)
            if samples:
                result.groups.append(samples)
        result.stats = self._stats(pairs, result, counters)
        return result

    def _triggers_retry(self, pair: _Pair) -> bool:
        """Every valid critique is followed by a refinement, whatever outcome it reports."""
        return pair.reflection is not None and not pair.base.info.get("error")

    def _stats(self, pairs: list[_Pair], result: ExplorationResult, counters: RolloutCounters) -> dict[str, float]:
        """Base-sample statistics, critique and refinement counts, refinement success rate, sample kinds."""
        stats = base_stats([p.base.reward for p in pairs], counters)
        refinements = [p.retry for p in pairs if p.retry is not None]
        stats["critiques"] = float(sum(p.reflection_response is not None for p in pairs))
        stats["invalid_critiques"] = float(counters.counts["invalid_reflections"])
        stats["refinements"] = float(len(refinements))
        stats["refinement_success_rate"] = (
            sum(is_success(t.reward) for t in refinements) / len(refinements) if refinements else 0.0
        )
        kinds = [s.kind for g in result.groups for s in g]
        for kind in ("base", "refinement"):
            stats[f"samples_{kind}"] = float(kinds.count(kind))
        return stats


def _prefix_messages(trajectory: Trajectory, k: int) -> list[Message]:
    """Messages before assistant turn ``k``: system, x_0, y_0, ..., x_k (copied verbatim)."""
    out: list[Message] = []
    seen = 0
    for m in trajectory.messages:
        if m.role == "assistant":
            if seen == k:
                break
            seen += 1
        out.append(m)
    return out
