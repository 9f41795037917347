"""``R3LExplorer``: reflect-then-retry exploration (spec section 1, the paper's Algorithm 1).

For every task:

1. roll out N/2 base trajectories from the current policy;
2. the policy reflects on each one (a JSON report: outcome, root cause, pivot step k);
3. a valid report that asks for a retry restores the environment to turn k (replaying the base
   trajectory's first k actions) and the policy retries from there with the report as guidance;
4. the group is base ∪ distill, a distill sample being the base prefix before k plus the retry's
   suffix with the guidance REMOVED; both get the pivot mask (turns before k are context only);
5. verified corrections also yield training data: the reflection, and the guided retry.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Literal

from r3l_lightning.advantages import AdvantageMode, SingletonRule, group_advantages
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, base_stats, is_success
from r3l_lightning.explore.episodes import EpisodeState, RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.explore.group import GroupExplorer
from r3l_lightning.explore.records import pairs_record
from r3l_lightning.explore.reflection import (
    Reflection,
    guidance_text,
    parse_reflection,
    reflection_messages,
    report_schema,
)
from r3l_lightning.prompts import GUIDANCE_TEMPLATE, REFLECTION_SYSTEM_PROMPT, check_template
from r3l_lightning.trajectory import Message, SampleKind, TrainingSample, Trajectory, make_sample

log = logging.getLogger(__name__)

SFTRule = Literal["paper", "reference", "none"]
CorrectionLoss = Literal["sft", "reinforce"]
RetrySelection = Literal["all", "best"]


@dataclass
class _Pair:
    """A base trajectory, its reflection, and (when triggered) its retries."""

    task: Task
    base: Trajectory
    reflection_messages: list[Message]
    reflection_response: Message | None = None
    reflection: Reflection | None = None
    retries: list[Trajectory] = field(default_factory=list)
    pivot: int = 0
    invalid_reason: str = ""  # why the reflection is invalid (parse_reflection's reason)


class R3LExplorer(GroupExplorer):
    """Reflect-then-retry exploration (R³L, spec section 1).

    Per task: ``group_size // 2`` base trajectories; a reflection on each; ``retries_per_base`` retries
    from the pivot with guidance when the reflection is valid, not ``success`` and the pivot is in range
    (and the environment did not crash in the base episode); the group is base ∪ distill.

    Paper defaults, with the reference code's behaviour one switch away:

    - ``advantage``: ``r3l`` (paper) or ``r3l_reference`` (see :mod:`r3l_lightning.advantages`).
    - ``retry_selection`` (only with ``retries_per_base > 1``): ``all`` (the paper's retry-count study:
      every retry's distill sample joins the group) or ``best`` (the highest reward, first of equals).
    - ``sft_rule``: which retries are verified corrections. ``paper``: R' > R. ``reference`` (the
      reference code's ALFWorld / ScienceWorld / WebShop workflows): R' ≥ 1 and (R' > R or the retry
      took fewer turns than its base). ``none``: no correction data.
    - ``correction_loss``: how a correction (its reflection, and its guided retry) trains. ``sft``
      (paper): SFT samples, weighted by ``model.sft_coef``. ``reinforce`` (reference code): each one is
      a group of its own with reward 1.0, trained in the RL loss with the advantage its mode gives a lone
      reward of 1 (1.0 under ``r3l_reference``).
    - ``keep_success_reflections`` (reference code): a ``success`` reflection on a successful base
      trajectory is also kept as correction data.
    - ``pivotal_credit: false`` ("w/o pivotal credit"): every assistant turn of every sample, the
      guided retry's included, is trainable (as the reference code's w/o-credit workflow).
    - ``reflection_decoding``: ``schema`` (default) decodes every reflection under the JSON schema of a
      valid report for that trajectory (:func:`~r3l_lightning.explore.reflection.report_schema`: all fields,
      a pivot in [0, K−1], an outcome the reward allows, free-text fields of at most
      ``reflection_field_max_chars`` characters), so that any model writes parseable reports; ``free`` is
      the paper's unconstrained decoding, whose invalid reports are counted and skipped.
      ``reflection_field_max_chars=None`` sizes the free-text fields to the token budget:
      ``reflection_max_new_tokens − 64`` characters each (the JSON skeleton takes ~50 tokens and text runs
      at ≥ 3 characters per token, so three full fields still fit).
    - ``reflection_prompt``, ``guidance_template``: the prompts (defaults in :mod:`r3l_lightning.prompts`).
    """

    # Subclasses (Reflect-GRPO, Critique-GRPO) reflect on failures only and/or retry from scratch.
    reflect_on: Literal["all", "failures"] = "all"
    retry_from_scratch: bool = False

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "r3l",
        alpha: float = 3.0,
        singleton: SingletonRule = "no_signal",
        reflection_temperature: float = 0.7,
        reflection_max_new_tokens: int = 512,
        reflection_decoding: Literal["schema", "free"] = "schema",
        reflection_field_max_chars: int | None = None,
        retries_per_base: int = 1,
        retry_selection: RetrySelection = "all",
        pivotal_credit: bool = True,
        sft_rule: SFTRule = "paper",
        correction_loss: CorrectionLoss = "sft",
        keep_success_reflections: bool = False,
        reflection_prompt: str = REFLECTION_SYSTEM_PROMPT,
        guidance_template: str = GUIDANCE_TEMPLATE,
        seed: int = 0,
    ) -> None:
        super().__init__(group_size, temperature, top_p, max_new_tokens, advantage, alpha, singleton, seed=seed)
        if group_size < 2:
            raise ValueError(f"{type(self).__name__} needs group_size >= 2 (N/2 base + N/2 retries), got {group_size}")
        if retries_per_base < 1:
            raise ValueError(f"retries_per_base must be >= 1, got {retries_per_base}")
        for name, value, options in (("retry_selection", retry_selection, ("all", "best")),
                                     ("sft_rule", sft_rule, ("paper", "reference", "none")),
                                     ("correction_loss", correction_loss, ("sft", "reinforce"))):
            if value not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        if correction_loss == "reinforce" and group_advantages([1.0], advantage, alpha, singleton=singleton).item() == 0:
            raise ValueError(
                f"correction_loss='reinforce' trains each correction as a one-sample group of reward 1, which "
                f"advantage {advantage!r} (singleton {singleton!r}) gives 0: use advantage r3l_reference (as "
                f"the reference code) or singleton zero_baseline, or correction_loss 'sft'"
            )
        if reflection_decoding not in ("schema", "free"):
            raise ValueError(f"reflection_decoding must be 'schema' or 'free', got {reflection_decoding!r}")
        self.reflection_sampling = SamplingParams(reflection_temperature, top_p, reflection_max_new_tokens)
        self.reflection_decoding = reflection_decoding
        self.reflection_field_max_chars = (
            reflection_field_max_chars if reflection_field_max_chars is not None
            else max(16, reflection_max_new_tokens - 64)
        )
        self.retries_per_base = retries_per_base
        self.retry_selection = retry_selection
        self.pivotal_credit = pivotal_credit
        self.sft_rule = sft_rule
        self.correction_loss = correction_loss
        self.keep_success_reflections = keep_success_reflections
        self.reflection_prompt = reflection_prompt
        self.guidance_template = check_template("guidance_template", guidance_template, "report")

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
                pivot = self._credit_pivot(pair)
                for trajectory in [pair.base] + [self._distill(pair, retry) for retry in pair.retries]:
                    trajectories.append(trajectory)
                    pivots.append(pivot)
            samples = self.make_group(ctx, trajectories, pivots, task.task_id, counters)
            corrections = [self._corrections([p], ctx, task.task_id, counters) for p in task_pairs]  # per pair
            record = pairs_record(task, task_pairs, trajectories, samples, corrections)
            flat = [s for pair_corrections in corrections for s in pair_corrections]
            if self.correction_loss == "sft":
                result.sft += flat
            else:  # one-sample RL groups, packed with their task's group
                samples += flat
            if samples:
                result.groups.append(samples)
            result.records.append(record)
        result.stats = self._stats(pairs, result, counters)
        return result

    def _pair(self, task: Task, trajectory: Trajectory, ctx: RolloutContext) -> _Pair:
        return _Pair(task, trajectory, reflection_messages(trajectory, ctx.env.system_prompt(), self.reflection_prompt))

    def _reflect_and_retry(self, tasks: list[Task], per_task: int, ctx: RolloutContext,
                           counters: RolloutCounters) -> list[_Pair]:
        """``per_task`` base trajectories of every task (task-major), a reflection on each, their retries."""
        base_groups = self.rollout(tasks, per_task, ctx, counters)
        pairs = [self._pair(task, t, ctx) for task, group in zip(tasks, base_groups) for t in group]
        self._reflect(pairs, ctx, counters)
        self._retry(pairs, ctx, counters)
        return pairs

    def _reflect(self, pairs: list[_Pair], ctx: RolloutContext, counters: RolloutCounters) -> None:
        if self.reflect_on == "failures":
            pairs = [p for p in pairs if not is_success(p.base.reward)]
        limit = ctx.engine.max_context()
        fitting, prompts = [], []
        for pair in pairs:
            prompt = ctx.chat.prompt_ids(pair.reflection_messages)
            if limit is not None and len(prompt) + self.reflection_sampling.max_new_tokens > limit:
                counters.add("reflection_context_overflows")  # no reflection, so no retry: as an invalid one
                pair.invalid_reason = "context_overflow"
                continue
            fitting.append(pair)
            prompts.append(prompt)
        pairs = fitting
        if not pairs:
            return
        params = self._params(self.reflection_sampling, 1)
        constraints = None
        if self.reflection_decoding == "schema":
            constraints = [
                Constraint(json_schema=report_schema(p.base.num_turns, p.base.reward, ctx.env.max_reward,
                                                     self.reflection_field_max_chars))
                if p.base.num_turns > 0 else None
                for p in pairs
            ]
        outputs = ctx.generate(prompts, params, "reflection", constraints)
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
        for pair, state in attempts:  # in attempt order
            pair.retries.append(state.trajectory)
            pair.pivot = self._pivot(pair)
        if self.retry_selection == "best":
            for pair in pairs:
                if pair.retries:
                    pair.retries = [max(pair.retries, key=lambda t: t.reward)]  # max keeps the first of equals

    def _triggers_retry(self, pair: _Pair) -> bool:
        """A valid reflection that asks for a retry, of an episode the environment did not crash in."""
        return pair.reflection is not None and pair.reflection.wants_retry and not pair.base.info.get("error")

    def _pivot(self, pair: _Pair) -> int:
        """The turn a retry starts from: the reflection's pivot, or 0 when retrying from scratch."""
        return 0 if self.retry_from_scratch else pair.reflection.retry_from_step

    def _credit_pivot(self, pair: _Pair) -> int:
        """First trainable turn of a pair's samples: the pivot of a retried pair under pivotal credit, else 0."""
        return pair.pivot if pair.retries and self.pivotal_credit else 0

    def _guidance(self, pair: _Pair) -> str:
        """The text a retry is guided by: the reflection report in ``guidance_template``."""
        return guidance_text(pair.reflection, self.guidance_template)

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
        guidance = self._guidance(pair)
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

    def _distill(self, pair: _Pair, retry: Trajectory, kind: SampleKind = "distill") -> Trajectory:
        """ORIGINAL prefix (no guidance) + the retry's suffix: what the model must learn unaided."""
        prefix = _prefix_messages(pair.base, pair.pivot)
        suffix = retry.messages[len(prefix) + (0 if pair.pivot == 0 else 1) :]
        distill = copy.copy(retry)
        distill.messages = prefix + suffix
        distill.kind = kind
        return distill

    def _admits(self, base: Trajectory, retry: Trajectory) -> bool:
        """Whether ``retry`` is a verified correction of ``base`` under ``sft_rule``."""
        if self.sft_rule == "paper":
            return retry.reward > base.reward
        if self.sft_rule == "reference":
            return is_success(retry.reward) and (retry.reward > base.reward or retry.num_turns < base.num_turns)
        return False

    def _corrections(self, pairs: list[_Pair], ctx: RolloutContext, group_id: str,
                     counters: RolloutCounters) -> list[TrainingSample]:
        """The reflection and the guided retry of every verified correction (and kept success reflections)."""
        samples = []
        for pair in pairs:
            if pair.reflection_response is None:
                continue
            admitted = [retry for retry in pair.retries if self._admits(pair.base, retry)]
            success_kept = (self.keep_success_reflections and pair.reflection is not None
                            and pair.reflection.outcome == "success" and is_success(pair.base.reward))
            if admitted or success_kept:
                reflection = Trajectory(pair.reflection_messages + [pair.reflection_response], task_id=group_id)
                samples.append(self._correction(ctx, reflection, 0, "sft_reflect", "reflection", group_id, counters))
            for retry in admitted:
                samples.append(self._correction(ctx, retry, self._credit_pivot(pair), "sft_retry", "retry", group_id,
                                                counters))
        return samples

    def _correction(self, ctx: RolloutContext, trajectory: Trajectory, pivot: int, sft_kind: SampleKind,
                    rl_kind: SampleKind, group_id: str, counters: RolloutCounters) -> TrainingSample:
        """A correction as an SFT sample, or (``correction_loss: reinforce``) as a one-sample group of reward 1."""
        if self.correction_loss == "sft":
            return make_sample(ctx.chat.tokenize(trajectory.messages), 1.0, sft_kind, pivot, group_id)
        lone = copy.copy(trajectory)
        lone.reward, lone.kind = 1.0, rl_kind
        (sample,) = self.make_group(ctx, [lone], [pivot], group_id, counters)
        return sample

    def _stats(self, pairs: list[_Pair], result: ExplorationResult, counters: RolloutCounters) -> dict[str, float]:
        stats = base_stats([p.base.reward for p in pairs], counters)
        n = max(len(pairs), 1)
        retried = [p for p in pairs if p.retries]
        retries = [(p, r) for p in retried for r in p.retries]
        reflected = [p for p in pairs if p.reflection_response is not None]
        stats["valid_reflection_rate"] = sum(p.reflection is not None for p in reflected) / max(len(reflected), 1)
        stats["retry_trigger_rate"] = counters.counts["retries_triggered"] / n
        stats["retry_improvement_rate"] = (
            sum(r.reward > p.base.reward for p, r in retries) / len(retries) if retries else 0.0
        )
        stats["mean_pivot"] = sum(p.pivot for p in retried) / len(retried) if retried else 0.0
        stats["reflections"] = float(len(reflected))  # counts for the per-epoch console summary
        stats["retries"] = float(len(retries))
        stats["retries_improved"] = float(sum(r.reward > p.base.reward for p, r in retries))
        kinds = [s.kind for g in result.groups for s in g] + [s.kind for s in result.sft]
        for kind in ("base", "distill", "reflection", "retry", "sft_reflect", "sft_retry"):
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
