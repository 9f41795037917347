"""Critique-GRPO (Zhang et al. 2025, arXiv 2506.03106) with the policy as its own critic.

``CritiqueGRPOExplorer`` (the method as the paper describes it), for every task:

1. roll out N trajectories from the task's prompt;
2. critique each one (R³L's JSON reflection report; an invalid one is counted and skips that refinement);
3. refine from scratch with the critique in the system prompt (R³L's retry with pivot 0);
4. the group is the N samples and the best refinement (highest reward, the first of equals) with the
   ORIGINAL prompt (critique removed), every assistant turn trainable; GRPO advantages over the N + 1
   rewards. The module trains the refinement with policy shaping instead of the importance ratio
   (``model.loss.shaping_gamma``). No SFT data.

``CritiqueGRPOReferenceExplorer`` (the reference code's ``alfworld/critique_grpo_workflow.py``) changes
steps 2 and 4: only FAILED samples (R < 1) are critiqued, in free text (a critique template, one user
message); a refinement is kept only if it beats its sample, and the best kept one (highest reward, first of
equals) REPLACES its sample and forms a group of its own, whose advantage follows the reference code's
one-sample rule (GRPO: baseline 0, σ = 1 → R/(1 + ε)); the other N − 1 samples are one group.
"""

from __future__ import annotations

from typing import Literal

from r3l_lightning.advantages import AdvantageMode
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.group import Candidate
from r3l_lightning.explore.r3l import R3LExplorer
from r3l_lightning.explore.reflection import Reflection, render_trajectory
from r3l_lightning.prompts import (
    CRITIQUE_TEMPLATE,
    GUIDANCE_TEMPLATE,
    REFINEMENT_TEMPLATE,
    REFLECTION_SYSTEM_PROMPT,
    check_template,
    fill,
)
from r3l_lightning.trajectory import Message


class CritiqueGRPOExplorer(R3LExplorer):
    """Critique-GRPO as the paper describes it, the policy as its own critic (steps: module docstring).

    ``reflection_temperature`` and ``reflection_max_new_tokens`` sample the critiques (reference: 0.7,
    1,024 tokens). ``reflection_decoding``: as :class:`~r3l_lightning.explore.r3l.R3LExplorer`'s (``schema``, the
    default, or ``free``: the critique decoded unconstrained, an invalid one refines nothing).
    """

    sample_kinds = ("base", "refinement")
    averaged_stats = R3LExplorer.averaged_stats | {"refinement_success_rate"}

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "grpo",
        reflection_temperature: float = 0.7,
        reflection_max_new_tokens: int = 1024,
        reflection_decoding: Literal["schema", "free"] = "schema",
        reflection_prompt: str = REFLECTION_SYSTEM_PROMPT,
        guidance_template: str = GUIDANCE_TEMPLATE,
        seed: int = 0,
    ) -> None:
        super().__init__(
            group_size=group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            advantage=advantage, reflection_temperature=reflection_temperature,
            reflection_max_new_tokens=reflection_max_new_tokens, reflection_decoding=reflection_decoding,
            pivotal_credit=False, sft_rule="none",
            reflection_prompt=reflection_prompt, guidance_template=guidance_template, seed=seed,
        )

    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size, ctx, counters)  # 1. N samples per task
        attempts = [a for g in groups for a in g.attempts]
        self.reflect(attempts, ctx, counters)  # 2. critiques
        self.retry(attempts, ctx, counters)  # 3. refinements from scratch, critique in the system prompt
        for group in groups:
            self.make_groups(ctx, group, counters)  # 4. the group(s) of the task

    def make_groups(self, ctx: RolloutContext, group: TaskGroup, counters: RolloutCounters) -> None:
        """The N samples and the best refinement, one group of N + 1."""
        candidates = [Candidate(a, a.base) for a in group.attempts]
        refined = [a for a in group.attempts if a.retries]
        if refined:
            best = max(refined, key=lambda a: a.retries[0].reward)  # max keeps the first of equal rewards
            candidates.append(self.refinement(best))
        self.make_group(ctx, group, candidates, counters)

    def refinement(self, attempt: Attempt) -> Candidate:
        """The attempt's refinement with the original prompt (critique removed), trained with policy shaping."""
        return Candidate(attempt, self.distill(attempt, attempt.retries[0]), "refinement", objective="shaped")

    def wants_retry(self, attempt: Attempt) -> bool:
        """Every valid critique, whatever outcome it reports (not after an environment crash)."""
        return attempt.report is not None and not attempt.base.info.get("error")

    def retry_start(self, attempt: Attempt) -> int:
        return 0

    def stats(self, groups: list[TaskGroup], counters: RolloutCounters) -> dict[str, float]:
        """Critique and refinement counts, refinement success rate."""
        attempts = [a for g in groups for a in g.attempts]
        refinements = [t for a in attempts for t in a.retries]
        return {
            "critiques": float(sum(a.reflection is not None for a in attempts)),
            "invalid_critiques": float(counters.counts["invalid_reflections"]),
            "refinements": float(len(refinements)),
            "refinement_success_rate": (
                sum(is_success(t.reward) for t in refinements) / len(refinements) if refinements else 0.0
            ),
        }


class CritiqueGRPOReferenceExplorer(CritiqueGRPOExplorer):
    """Critique-GRPO as the reference code runs it: free-text critiques of failures, the best improving
    refinement replaces its sample in a group of its own (module docstring).

    ``reflection_prompt`` asks for the critique (fields ``{trajectory}``, ``{reward}``; default
    :data:`~r3l_lightning.prompts.CRITIQUE_TEMPLATE`); ``guidance_template`` is the refinement's guidance (field
    ``{critique}``; default :data:`~r3l_lightning.prompts.REFINEMENT_TEMPLATE`). The other arguments are
    :class:`CritiqueGRPOExplorer`'s.
    """

    guidance_fields = ("critique",)

    def __init__(self, reflection_prompt: str = CRITIQUE_TEMPLATE, guidance_template: str = REFINEMENT_TEMPLATE,
                 **kwargs) -> None:
        super().__init__(reflection_prompt=check_template("reflection_prompt", reflection_prompt, "trajectory", "reward"),
                         guidance_template=guidance_template, **kwargs)
        self.singleton = "zero_baseline"  # the reference code's one-sample GRPO group: baseline 0, σ = 1

    def make_groups(self, ctx: RolloutContext, group: TaskGroup, counters: RolloutCounters) -> None:
        """The N samples, or N − 1 and the best improving refinement alone in its own group."""
        better = [a for a in group.attempts if a.retries and a.retries[0].reward > a.base.reward]
        best = max(better, key=lambda a: a.retries[0].reward) if better else None  # first of equals
        self.make_group(ctx, group, [Candidate(a, a.base) for a in group.attempts if a is not best], counters)
        if best is not None:
            self.make_group(ctx, group, [self.refinement(best)], counters)

    def reflects_on(self, attempt: Attempt) -> bool:
        return not is_success(attempt.base.reward)

    def reflection_messages(self, attempt: Attempt, ctx: RolloutContext) -> list[Message]:
        """One user message: the task instructions, the numbered trajectory and its feedback in ``reflection_prompt``."""
        trajectory = attempt.base
        shown = (f"Task instructions:\n{ctx.env.system_prompt()}\n\n{render_trajectory(trajectory)}\n\n"
                 f"Environment feedback:\n{trajectory.feedback}")
        return [Message("user", fill(self.reflection_prompt, trajectory=shown, reward=f"{trajectory.reward:g}"))]

    def reflection_constraint(self, attempt: Attempt, ctx: RolloutContext) -> Constraint | None:
        return None  # free text

    def read_reflection(self, attempt: Attempt, text: str) -> tuple[Reflection | None, str]:
        """A free-text critique has no report; it is invalid only when empty."""
        return None, "" if text.strip() else "empty"

    def wants_retry(self, attempt: Attempt) -> bool:
        """Every non-empty critique (not after an environment crash)."""
        return attempt.reflection is not None and not attempt.invalid_reason and not attempt.base.info.get("error")

    def guidance(self, attempt: Attempt) -> str:
        return fill(self.guidance_template, critique=attempt.reflection.content.strip())
