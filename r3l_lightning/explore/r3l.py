"""``R3LExplorer``: reflect-then-retry exploration (spec section 1, the paper's Algorithm 1).

For every task:

1. roll out N/2 base trajectories from the current policy;
2. the policy reflects on each one (a JSON report: outcome, root cause, pivot step k);
3. a valid report that asks for a retry restores the environment to turn k (replaying the base
   trajectory's first k actions) and the policy retries from there with the report as guidance;
4. the group is base ∪ distill, a distill sample being the base prefix before k plus the retry's
   suffix with the guidance REMOVED; both get the pivot mask (turns before k are context only);
5. verified corrections (R' > R) also yield SFT samples: the reflection, and the guided retry.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

from r3l_lightning.advantages import AdvantageMode
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, base_stats, is_success
from r3l_lightning.explore.episodes import EpisodeState, RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.explore.group import GroupExplorer
from r3l_lightning.explore.records import pairs_record
from r3l_lightning.explore.reflection import Reflection, guidance_text, parse_reflection, reflection_messages
from r3l_lightning.trajectory import Message, SampleKind, TrainingSample, Trajectory, make_sample

log = logging.getLogger(__name__)


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
    invalid_reason: str = ""  # why the reflection is invalid (parse_reflection's reason)


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
            sft = [self._sft_samples([pair], ctx, task.task_id) for pair in task_pairs]  # per pair: records
            result.sft += [s for pair_sft in sft for s in pair_sft]
            result.records.append(pairs_record(task, task_pairs, trajectories, samples, sft))
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
            ctx.progress(len(prompts), "reflection")
        for pair, (completion,) in zip(pairs, outputs):
            counters.add("tokens_reflection", len(completion.token_ids))
            pair.reflection_response = ctx.chat.assistant_message(completion.token_ids, completion.logprobs)
            reflection, reason = parse_reflection(pair.reflection_response.content, pair.base.num_turns)
            if reflection is None:
                counters.add("invalid_reflections")
                counters.add(f"invalid_reflection_{reason}")
                log.debug("invalid reflection (%s): %.200s", reason, pair.reflection_response.content)
            pair.reflection, pair.invalid_reason = reflection, reason

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
        stats["reflections"] = float(len(reflected))  # counts for the per-epoch console summary
        stats["retries"] = float(len(retried))
        stats["retries_improved"] = float(sum(p.retry.reward > p.base.reward for p in retried))
        kinds = [s.kind for g in result.groups for s in g] + [s.kind for s in result.sft]
        for kind in ("base", "distill", "retry", "sft_reflect", "sft_retry"):
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
