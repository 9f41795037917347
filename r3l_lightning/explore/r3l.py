"""``R3LExplorer``: reflect-then-retry exploration (the R³L paper's Algorithm 1).

For every task (:meth:`R3LExplorer.explore_groups`):

1. roll out N/2 base trajectories from the current policy;
2. reflect on each one (:meth:`R3LExplorer.reflect`: the policy writes a JSON report: outcome, root cause,
   pivot step k);
3. a valid report that asks for a retry restores the environment to turn k (replaying the base
   trajectory's first k actions) and the policy retries from there with the report as guidance
   (:meth:`R3LExplorer.retry`);
4. the group is base ∪ distill, a distill sample being the base prefix before k plus the retry's
   suffix with the guidance REMOVED; both get the pivot mask (turns before k are context only);
5. verified corrections also yield training data: the reflection, and the guided retry.

Subclasses change a step through the public hooks: :meth:`~R3LExplorer.reflects_on`,
:meth:`~R3LExplorer.reflection_messages`, :meth:`~R3LExplorer.reflection_constraint`,
:meth:`~R3LExplorer.read_reflection`, :meth:`~R3LExplorer.wants_retry`, :meth:`~R3LExplorer.retry_start`,
:meth:`~R3LExplorer.guidance` and :meth:`~R3LExplorer.admits`. Who writes the reflection is the one method
:meth:`~R3LExplorer.reflect`.
"""

from __future__ import annotations

import copy
import logging
from typing import ClassVar, Literal

from r3l_lightning.advantages import AdvantageMode, SingletonRule, group_advantages
from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.envs.base import Environment
from r3l_lightning.envs.countdown import CountdownEnv
from r3l_lightning.envs.math import MathEnv
from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import EpisodeState, RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.explore.group import Candidate, GroupExplorer
from r3l_lightning.explore.reflection import (
    FIELDS,
    Reflection,
    guidance_text,
    informativeness,
    parse_reflection,
    reflection_messages,
    report_schema,
)
from r3l_lightning.explore.reflectors import REFLECTORS, PolicyReflector, ReflectionRequest, Reflector
from r3l_lightning.prompts import GUIDANCE_TEMPLATE, REFLECTION_SYSTEM_PROMPT, check_template
from r3l_lightning.trajectory import Message, SampleKind, Trajectory

log = logging.getLogger(__name__)

SFTRule = Literal["paper", "reference", "authors", "none"]
ReflectionSchema = Literal["paper", "grounded"]
GuidancePlacement = Literal["paper", "after_observation", "authors"]
CorrectionLoss = Literal["sft", "reinforce"]
RetrySelection = Literal["all", "best"]
RetryFrom = Literal["pivot", "scratch", "authors"]
AuthorsWorkflow = Literal["countdown", "math", "agent"]


def authors_workflow(env: Environment) -> AuthorsWorkflow:
    """Which of the reference code's R³L workflows runs ``env``'s task: ``countdown`` and ``math``
    (``R3L/countdown``, ``R3L/dapo``, ``R3L/qwen_math``: attempts at one answer, retried from scratch) or
    ``agent`` (ALFWorld, ScienceWorld, WebShop: retried from the pivot). The ``authors`` values of
    ``retry_from``, ``sft_rule`` and ``guidance_placement`` follow it."""
    if isinstance(env, CountdownEnv):
        return "countdown"
    return "math" if isinstance(env, MathEnv) else "agent"


class R3LExplorer(GroupExplorer):
    """Reflect-then-retry exploration (R³L).

    Per task: ``group_size // 2`` base trajectories; a reflection on each; ``retries_per_base`` retries
    from the pivot with guidance when the reflection is valid, not ``success`` and the pivot is in range
    (and the environment did not crash in the base episode); the group is base ∪ distill.

    Paper defaults, with the reference code's behaviour one switch away:

    - ``advantage``: ``r3l`` (paper) or ``r3l_reference`` (see :mod:`r3l_lightning.advantages`).
    - ``retry_selection`` (only with ``retries_per_base > 1``): ``all`` (the paper's retry-count study:
      every retry's distill sample joins the group) or ``best`` (the highest reward, first of equals).
    - ``sft_rule``: which retries are verified corrections. ``paper``: R' > R. ``reference`` (the
      reference code's ALFWorld / ScienceWorld / WebShop workflows): R' ≥ 1 and (R' > R or the retry
      took fewer turns than its base). ``authors``: the reference code's rule for the task
      (:func:`authors_workflow`): Countdown and math R' > R and R' ≥ 1, the other tasks ``reference``.
      ``none``: no correction data.
    - ``retry_from``: ``pivot`` (the paper) restores the environment to the report's pivot k and retries from
      there; ``scratch`` (the reference code's Countdown and math workflows) retries from turn 0, while k still
      masks the first k turns of the base and of the distill sample (as many as it has), and the guided retry
      is trainable from its first turn; ``authors``: ``scratch`` on Countdown and math, ``pivot`` elsewhere.
    - ``correction_loss``: how a correction (its reflection, and its guided retry) trains. ``sft``
      (paper): SFT samples, weighted by ``model.loss.sft_coef``. ``reinforce`` (reference code): each one is
      a group of its own with reward 1.0, trained in the RL loss with the advantage its mode gives a lone
      reward of 1 (1.0 under ``r3l_reference``).
    - ``keep_success_reflections`` (reference code): a ``success`` reflection on a successful base
      trajectory is also kept as correction data.
    - ``sft_reflections``: whether a verified correction's reflection is trained (the paper's D_reflect, as
      ``correction_loss`` says; default true). ``false`` keeps only the corrected retries: with ``reflector: reference`` the
      reports are not the policy's own, and at ~500 tokens of context each they dominate a CPU step.
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
    - ``reflection_prompt``, ``guidance_template``: the prompts (defaults in :mod:`r3l_lightning.prompts`);
      the template names ``{report}`` (the JSON report) or any report field (``{improvement_suggestion}``);
      ``guidance_template: null`` is the default template.
    - ``reflector`` (who writes the report; :mod:`r3l_lightning.explore.reflectors`): ``policy`` (the paper),
      ``reference`` (the environment, from the task's known solution: a teacher), or a
      :class:`~r3l_lightning.explore.reflectors.Reflector` object, e.g.
      ``{class_path: r3l_lightning.explore.reflectors.EngineReflector, init_args: {model: ...}}`` (another
      model; ``endpoint: http://host:port/v1`` for an OpenAI-compatible server). The policy always generates the
      retry itself.
    - ``reflection_schema``: ``paper`` (the five fields) or ``grounded`` (**departs from the paper**): the
      environment adds fields whose values a retry can act on, decoded under the same schema
      (:meth:`~r3l_lightning.envs.base.Environment.grounded_fields`: Countdown's equation to try, ALFWorld's and
      ScienceWorld's corrected action at the pivot among the admissible actions, math's first wrong step and
      corrected value); the guidance ends with them.
    - ``guidance_placement``: ``paper`` (the spec: in the system prompt when the pivot is turn 0, as a system
      message before the pivot's observation otherwise) or ``after_observation`` (a system message right after
      the pivot's observation, just before the retried response, for every pivot) or ``authors`` (the
      reference code's, per task: Countdown appends it to the first user message; math puts it in the system
      prompt; the other tasks, for k > 0, put it after the pivot's observation and then repeat that
      observation, in the distill sample too (guidance removed), and for k = 0 in the system prompt).
    """

    sample_kinds: ClassVar[tuple[SampleKind, ...]] = ("base", "distill", "reflection", "retry", "sft_reflect",
                                                      "sft_retry")
    guidance_fields: ClassVar[tuple[str, ...]] = ("report",)  # the fields guidance_template must name
    averaged_stats = GroupExplorer.averaged_stats | {"valid_reflection_rate", "retry_trigger_rate",
                                                     "retry_improvement_rate", "mean_pivot",
                                                     "informative_reflection_rate", "retry_same_as_base_rate"}

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
        sft_reflections: bool = True,
        reflection_prompt: str = REFLECTION_SYSTEM_PROMPT,
        guidance_template: str | None = None,
        reflector: Literal["policy", "reference"] | Reflector = "policy",
        reflection_schema: ReflectionSchema = "paper",
        guidance_placement: GuidancePlacement = "paper",
        retry_from: RetryFrom = "pivot",
        seed: int = 0,
    ) -> None:
        super().__init__(group_size, temperature, top_p, max_new_tokens, advantage, alpha, singleton, seed=seed)
        if group_size < 2:
            raise ValueError(f"{type(self).__name__} needs group_size >= 2 (N/2 base + N/2 retries), got {group_size}")
        if retries_per_base < 1:
            raise ValueError(f"retries_per_base must be >= 1, got {retries_per_base}")
        for name, value, options in (("retry_selection", retry_selection, ("all", "best")),
                                     ("sft_rule", sft_rule, ("paper", "reference", "authors", "none")),
                                     ("correction_loss", correction_loss, ("sft", "reinforce")),
                                     ("retry_from", retry_from, ("pivot", "scratch", "authors"))):
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
        self.sft_reflections = sft_reflections
        self.reflection_prompt = reflection_prompt
        self.guidance_template = self.check_guidance_template(
            GUIDANCE_TEMPLATE if guidance_template is None else guidance_template)
        self.reflector = _reflector(reflector)
        for name, value, options in (("reflection_schema", reflection_schema, ("paper", "grounded")),
                                     ("guidance_placement", guidance_placement,
                                      ("paper", "after_observation", "authors"))):
            if value not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        self.reflection_schema = reflection_schema
        self.guidance_placement = guidance_placement
        self.retry_from = retry_from

    def check_guidance_template(self, template: str) -> str:
        """``template`` if it names ``{report}`` or a report field; otherwise a ValueError saying so."""
        if any("{" + f + "}" in template for f in FIELDS):
            return template
        return check_template("guidance_template", template, *self.guidance_fields)

    # ----- the algorithm -------------------------------------------------------------------------
    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size // 2, ctx, counters)  # 1. N/2 base trajectories per task
        attempts = [a for g in groups for a in g.attempts]
        self.reflect(attempts, ctx, counters)  # 2. a reflection on each
        self.retry(attempts, ctx, counters)  # 3. guided retries from the pivot
        for group in groups:
            self.make_group(ctx, group, [c for a in group.attempts for c in self.candidates(a)], counters)  # 4.
            for attempt in group.attempts:
                self.add_corrections(ctx, group, attempt, counters)  # 5. verified corrections

    # ----- step 2: reflection ----------------------------------------------------------------------
    def reflect(self, attempts: list[Attempt], ctx: RolloutContext, counters: RolloutCounters) -> None:
        """Reflect on every attempt :meth:`reflects_on` accepts: the ``reflector`` writes the reports (one batch),
        which set ``reflection``, ``report`` / ``invalid_reason`` (:meth:`read_reflection`) and
        ``uninformative_reason`` (:func:`~r3l_lightning.explore.reflection.informativeness`)."""
        uses_engine = isinstance(self.reflector, PolicyReflector)
        limit = ctx.engine.max_context() if uses_engine else None
        requests: list[ReflectionRequest] = []
        reflected: list[Attempt] = []
        for attempt in attempts:
            if not self.reflects_on(attempt):
                continue
            if self.reflection_schema == "grounded" and attempt.base.num_turns > 0:
                attempt.grounded = ctx.env.grounded_fields(attempt.task, attempt.base)
            attempt.reflection_prompt = self.reflection_messages(attempt, ctx)
            if limit is not None:
                prompt = ctx.chat.prompt_ids(attempt.reflection_prompt)
                if len(prompt) + self.reflection_sampling.max_new_tokens > limit:
                    counters.add("reflection_context_overflows")  # no reflection, so no retry: as an invalid one
                    attempt.invalid_reason = "context_overflow"
                    continue
            reflected.append(attempt)
            requests.append(ReflectionRequest(attempt.task, attempt.base, attempt.reflection_prompt,
                                              self.reflection_constraint(attempt, ctx),
                                              FIELDS + tuple(g.name for g in attempt.grounded)))
        if not reflected:
            return
        messages = self.reflector.reflect(requests, ctx, self.sampling_params(self.reflection_sampling, 1))
        for attempt, message in zip(reflected, messages):
            attempt.reflection_author = self.reflector.author
            if message is None:  # the reflector could not write one (no reference solution, a failed endpoint)
                attempt.invalid_reason = "no_report"
                counters.add("invalid_reflections")
                counters.add("invalid_reflection_no_report")
                continue
            counters.add("tokens_reflection", len(message.token_ids))
            attempt.reflection = message
            attempt.report, attempt.invalid_reason = self.read_reflection(attempt, message.content)
            if attempt.invalid_reason:
                counters.add("invalid_reflections")
                counters.add(f"invalid_reflection_{attempt.invalid_reason}")
                log.debug("invalid reflection (%s): %.200s", attempt.invalid_reason, message.content)
                continue
            if attempt.report is None:  # a free-text reflection (Critique-GRPO's reference variant) has no report
                continue
            attempt.uninformative_reason = informativeness(
                attempt.report, [m.content for m in attempt.reflection_prompt], attempt.base.actions)
            if attempt.uninformative_reason:
                counters.add(f"uninformative_reflection_{attempt.uninformative_reason}")

    def reflects_on(self, attempt: Attempt) -> bool:
        """Whether ``attempt`` gets a reflection (R³L: every one)."""
        return True

    def reflection_messages(self, attempt: Attempt, ctx: RolloutContext) -> list[Message]:
        """The messages a reflection on ``attempt`` is asked with (R³L: the JSON report request)."""
        return reflection_messages(attempt.base, ctx.env.system_prompt(), self.reflection_prompt, attempt.grounded)

    def reflection_constraint(self, attempt: Attempt, ctx: RolloutContext) -> Constraint | None:
        """What the reflection is decoded under: the report's JSON schema (``reflection_decoding: schema``)."""
        if self.reflection_decoding != "schema" or attempt.base.num_turns == 0:
            return None
        return Constraint(json_schema=report_schema(attempt.base.num_turns, attempt.base.reward, ctx.env.max_reward,
                                                    self.reflection_field_max_chars, attempt.grounded))

    def read_reflection(self, attempt: Attempt, text: str) -> tuple[Reflection | None, str]:
        """The validated report of ``text``, or None and why it is invalid (R³L: :func:`parse_reflection`)."""
        return parse_reflection(text, attempt.base.num_turns, attempt.grounded)

    # ----- step 3: retries -----------------------------------------------------------------------
    def retry(self, attempts: list[Attempt], ctx: RolloutContext, counters: RolloutCounters) -> None:
        """``retries_per_base`` guided retries of every attempt :meth:`wants_retry` accepts, all stepped
        together from their :meth:`retry_start`; a replay that fails costs that retry."""
        started: list[tuple[Attempt, EpisodeState]] = []
        for attempt in attempts:
            if not self.wants_retry(attempt):
                continue
            counters.add("retries_triggered")
            for _ in range(self.retries_per_base):
                state = self.restore(attempt, ctx, counters)
                if state is None:
                    break
                started.append((attempt, state))
        run_episodes(ctx, [s for _, s in started], self.sampling_params(self.sampling, 2), counters, "tokens_retry")
        for attempt, state in started:  # in start order
            attempt.retries.append(state.trajectory)
            attempt.pivot = self.restart_turn(attempt, ctx.env)
        if self.retry_selection == "best":
            for attempt in attempts:
                if attempt.retries:
                    attempt.retries = [max(attempt.retries, key=lambda t: t.reward)]  # max keeps the first of equals

    def wants_retry(self, attempt: Attempt) -> bool:
        """A valid report that asks for a retry, of an episode the environment did not crash in."""
        return attempt.report is not None and attempt.report.wants_retry and not attempt.base.info.get("error")

    def retry_start(self, attempt: Attempt) -> int:
        """The report's pivot k (R³L): where a retry starts (``retry_from: pivot``) and where the credit starts."""
        return attempt.report.retry_from_step

    def restart_turn(self, attempt: Attempt, env: Environment) -> int:
        """The turn a retry of ``attempt`` actually restarts from: 0 when retrying from scratch, else
        :meth:`retry_start`."""
        scratch = self.retry_from == "scratch" or (self.retry_from == "authors" and authors_workflow(env) != "agent")
        return 0 if scratch else self.retry_start(attempt)

    def guidance(self, attempt: Attempt) -> str:
        """The text a retry is guided by: the reflection report in ``guidance_template``."""
        return guidance_text(attempt.report, self.guidance_template, attempt.grounded)

    def restore(self, attempt: Attempt, ctx: RolloutContext, counters: RolloutCounters) -> EpisodeState | None:
        """A new episode restored to the retry's start turn, with guidance inserted; None on replay mismatch."""
        k = self.restart_turn(attempt, ctx.env)
        base = attempt.base
        state = start_episode(ctx, attempt.task, counters)
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
        guidance = self.guidance(attempt)
        prefix = _prefix_messages(base, k)
        placement = self.guidance_placement
        workflow = authors_workflow(ctx.env) if placement == "authors" else "agent"
        if placement == "after_observation":
            messages = prefix + [Message("system", guidance, guidance=True)]
        elif placement == "authors" and workflow == "countdown" and k == 0:  # no system prompt there
            messages = prefix[:-1] + [Message("user", f"{prefix[-1].content}\n\n{guidance}", guidance=True)]
        elif placement == "authors" and k > 0:  # after x_k, then x_k again
            messages = prefix + [Message("system", guidance, guidance=True), Message("user", prefix[-1].content)]
            state.trajectory.info["repeated_observation"] = True
        elif k == 0:
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

    # ----- step 4: the group -----------------------------------------------------------------------
    def candidates(self, attempt: Attempt) -> list[Candidate]:
        """The attempt's base and the distill copy of each retry, from its credit pivot on (a distill sample with
        fewer turns than the pivot, after a retry from scratch, is context only)."""
        credit = self.credit_pivot(attempt)
        distills = [self.distill(attempt, retry) for retry in attempt.retries]
        return [Candidate(attempt, attempt.base, "base", credit)] + [
            Candidate(attempt, d, "distill", min(credit, d.num_turns)) for d in distills]

    def credit_pivot(self, attempt: Attempt) -> int:
        """First trainable turn of an attempt's base and distill samples: the report's pivot k of a retried
        attempt under pivotal credit (whether the retry restarted there or from scratch), else 0."""
        return self.retry_start(attempt) if attempt.retries and self.pivotal_credit else 0

    def distill(self, attempt: Attempt, retry: Trajectory) -> Trajectory:
        """ORIGINAL prefix (no guidance) + the retry's suffix: what the model must learn unaided (with the
        repeated pivot observation of ``guidance_placement: authors``)."""
        prefix = _prefix_messages(attempt.base, attempt.pivot)
        guided = _prefix_messages(retry, attempt.pivot)  # the retry's own prefix: the base's, with the guidance
        suffix = retry.messages[len(guided):]
        if retry.info.get("repeated_observation"):
            prefix = prefix + [guided[-1]]
        distill = copy.copy(retry)
        distill.messages = prefix + suffix
        return distill

    # ----- step 5: verified corrections ------------------------------------------------------------
    def admits(self, attempt: Attempt, retry: Trajectory, env: Environment) -> bool:
        """Whether ``retry`` is a verified correction of the attempt's base under ``sft_rule`` (on ``env``'s task)."""
        base = attempt.base
        rule = self.sft_rule
        if rule == "authors":
            rule = "reference" if authors_workflow(env) == "agent" else "improved_success"
        if rule == "paper":
            return retry.reward > base.reward
        if rule == "improved_success":  # the reference code's Countdown and math rule
            return is_success(retry.reward) and retry.reward > base.reward
        if rule == "reference":
            return is_success(retry.reward) and (retry.reward > base.reward or retry.num_turns < base.num_turns)
        return False

    def add_corrections(self, ctx: RolloutContext, group: TaskGroup, attempt: Attempt,
                        counters: RolloutCounters) -> None:
        """The reflection and the guided retry of every verified correction (and of a kept success reflection)."""
        if attempt.reflection is None:
            return
        admitted = [retry for retry in attempt.retries if self.admits(attempt, retry, ctx.env)]
        success_kept = (self.keep_success_reflections and attempt.report is not None
                        and attempt.report.outcome == "success" and is_success(attempt.base.reward))
        if self.sft_reflections and (admitted or success_kept):
            reflection = Trajectory(attempt.reflection_prompt + [attempt.reflection], task_id=group.task.task_id)
            self.add_correction(ctx, group, attempt, reflection, 0, "sft_reflect", "reflection", None, counters)
        retry_credit = attempt.pivot if self.pivotal_credit else 0  # the replayed turns, none after a restart at 0
        for retry in admitted:
            self.add_correction(ctx, group, attempt, retry, retry_credit, "sft_retry", "retry", retry.reward, counters)

    def add_correction(self, ctx: RolloutContext, group: TaskGroup, attempt: Attempt, trajectory: Trajectory,
                       pivot: int, sft_kind: SampleKind, rl_kind: SampleKind, reward: float | None,
                       counters: RolloutCounters) -> None:
        """A correction as an SFT sample, or (``correction_loss: reinforce``) as a one-sample group of reward 1."""
        if self.correction_loss == "sft":
            self.add_sample(ctx, group, attempt, trajectory.messages, sft_kind, 1.0, pivot, reward, objective="sft")
        else:
            self.make_group(ctx, group, [Candidate(attempt, trajectory, rl_kind, pivot, reward=1.0, objective="policy")],
                            counters)

    # ----- statistics ------------------------------------------------------------------------------
    def stats(self, groups: list[TaskGroup], counters: RolloutCounters) -> dict[str, float]:
        return self.reflection_stats([a for g in groups for a in g.attempts], counters)

    def reflection_stats(self, attempts: list[Attempt], counters: RolloutCounters) -> dict[str, float]:
        """Reflection validity, retry trigger and improvement rates, mean pivot, counts (over ``attempts``)."""
        retried = [a for a in attempts if a.retries]
        retries = [(a, r) for a in retried for r in a.retries]
        reflected = [a for a in attempts if a.reflection is not None]
        improved = sum(r.reward > a.base.reward for a, r in retries)
        return {
            "informative_reflection_rate": sum(a.informative for a in reflected) / max(len(reflected), 1),
            "valid_reflections": float(sum(a.report is not None for a in reflected)),
            "informative_reflections": float(sum(a.informative for a in reflected)),
            "retry_same_as_base_rate": (sum(a.retry_same_as_base(r) for a, r in retries) / len(retries)
                                        if retries else 0.0),
            "valid_reflection_rate": sum(a.report is not None for a in reflected) / max(len(reflected), 1),
            "retry_trigger_rate": counters.counts["retries_triggered"] / max(len(attempts), 1),
            "retry_improvement_rate": improved / len(retries) if retries else 0.0,
            "mean_pivot": sum(a.pivot for a in retried) / len(retried) if retried else 0.0,
            "reflections": float(len(reflected)),  # counts for the per-epoch console summary
            "retries": float(len(retries)),
            "retries_improved": float(improved),
        }


def _reflector(reflector: str | Reflector) -> Reflector:
    if isinstance(reflector, Reflector):
        return reflector
    if reflector not in REFLECTORS:
        raise ValueError(
            f"reflector must be one of {', '.join(REFLECTORS)} or a Reflector, got {reflector!r}; for another model "
            "write reflector: {class_path: r3l_lightning.explore.reflectors.EngineReflector, init_args: {model: "
            "<HF id or directory>}} (or init_args: {endpoint: http://host:port/v1, endpoint_model: <name>})")
    return REFLECTORS[reflector]()


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
