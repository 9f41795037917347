"""``CritiqueGRPOExplorer``: Critique-GRPO exploration with the policy as its own critic."""

from __future__ import annotations

from typing import Literal

from r3l_lightning.advantages import AdvantageMode
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, base_stats, is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.r3l import R3LExplorer, _Pair
from r3l_lightning.explore.records import pairs_record
from r3l_lightning.explore.reflection import render_trajectory
from r3l_lightning.prompts import (
    CRITIQUE_TEMPLATE,
    GUIDANCE_TEMPLATE,
    REFINEMENT_TEMPLATE,
    REFLECTION_SYSTEM_PROMPT,
    check_template,
    fill,
)
from r3l_lightning.trajectory import Message, TrainingSample, Trajectory

CritiqueVariant = Literal["paper", "reference"]


class CritiqueGRPOExplorer(R3LExplorer):
    """Critique-GRPO exploration (Zhang et al. 2025, arXiv 2506.03106) with the policy as its own critic.

    Per task: ``group_size`` = N samples from scratch, critiques, and refinements from scratch with the
    critique in the system prompt (R³L's retry with pivot 0). A kept refinement trains with the ORIGINAL
    prompt (critique removed), every assistant turn trainable; the module trains it with policy shaping
    instead of the importance ratio (``model.shaping_gamma``). No SFT data.

    ``variant: paper`` (default; the method as the paper describes it): every sample is critiqued with
    R³L's JSON report (an invalid one is counted and skips that refinement); the best refinement of the
    task (highest reward, the first of equals) joins the group; advantages over the N + 1 rewards.

    ``variant: reference`` (the reference code's ``alfworld/critique_grpo_workflow.py``): only FAILED
    samples (R < 1) are critiqued, in free text (``critique_template``, one user message); a refinement
    is kept only if it beats its sample; the best kept one (highest reward, first of equals) REPLACES
    its sample and forms a group of its own, whose advantage follows the reference code's one-sample rule
    (GRPO: baseline 0, σ = 1 → R/(1 + ε)); the other N − 1 samples are one group.

    ``reflection_temperature`` and ``reflection_max_new_tokens`` sample the critiques (reference: 0.7,
    1,024 tokens).
    """

    retry_from_scratch = True

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "grpo",
        variant: CritiqueVariant = "paper",
        reflection_temperature: float = 0.7,
        reflection_max_new_tokens: int = 1024,
        reflection_prompt: str = REFLECTION_SYSTEM_PROMPT,
        guidance_template: str = GUIDANCE_TEMPLATE,
        critique_template: str = CRITIQUE_TEMPLATE,
        refinement_template: str = REFINEMENT_TEMPLATE,
        seed: int = 0,
    ) -> None:
        if variant not in ("paper", "reference"):
            raise ValueError(f"variant must be paper or reference, got {variant!r}")
        super().__init__(
            group_size=group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            advantage=advantage, singleton="zero_baseline" if variant == "reference" else "no_signal",
            reflection_temperature=reflection_temperature, reflection_max_new_tokens=reflection_max_new_tokens,
            pivotal_credit=False, sft_rule="none", reflection_prompt=reflection_prompt,
            guidance_template=guidance_template, seed=seed,
        )
        self.variant = variant
        self.critique_template = check_template("critique_template", critique_template, "trajectory", "reward")
        self.refinement_template = check_template("refinement_template", refinement_template, "critique")

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        pairs = self._reflect_and_retry(tasks, self.group_size, ctx, counters)
        result = ExplorationResult()
        for i, task in enumerate(tasks):
            task_pairs = pairs[i * self.group_size : (i + 1) * self.group_size]
            group = self._paper_group if self.variant == "paper" else self._reference_group
            trajectories, samples = group(task_pairs, ctx, task.task_id, counters)
            if samples:
                result.groups.append(samples)
            result.records.append(pairs_record(task, task_pairs, trajectories, samples))
        result.stats = self._stats(pairs, result, counters)
        return result

    def _paper_group(self, pairs: list[_Pair], ctx: RolloutContext, group_id: str,
                     counters: RolloutCounters) -> tuple[list[Trajectory], list[TrainingSample]]:
        """The N samples and the best refinement, one group of N + 1 (trajectories, and their samples)."""
        trajectories = [p.base for p in pairs]
        refined = [p for p in pairs if p.retries]
        if refined:
            best = max(refined, key=lambda p: p.retries[0].reward)  # max keeps the first of equal rewards
            trajectories.append(self._distill(best, best.retries[0], kind="refinement"))
        return trajectories, self.make_group(ctx, trajectories, [0] * len(trajectories), group_id, counters)

    def _reference_group(self, pairs: list[_Pair], ctx: RolloutContext, group_id: str,
                         counters: RolloutCounters) -> tuple[list[Trajectory], list[TrainingSample]]:
        """The N samples, or N − 1 and the best improving refinement alone in its own group."""
        better = [p for p in pairs if p.retries and p.retries[0].reward > p.base.reward]
        best = max(better, key=lambda p: p.retries[0].reward) if better else None  # first of equals
        kept = [p.base for p in pairs if p is not best]
        samples = self.make_group(ctx, kept, [0] * len(kept), group_id, counters)
        if best is None:
            return kept, samples
        refinement = self._distill(best, best.retries[0], kind="refinement")
        return kept + [refinement], samples + self.make_group(ctx, [refinement], [0], group_id, counters)

    def _pair(self, task: Task, trajectory: Trajectory, ctx: RolloutContext) -> _Pair:
        if self.variant == "paper":
            return super()._pair(task, trajectory, ctx)
        attempt = (f"Task instructions:\n{ctx.env.system_prompt()}\n\n{render_trajectory(trajectory)}\n\n"
                   f"Environment feedback:\n{trajectory.feedback}")
        prompt = fill(self.critique_template, trajectory=attempt, reward=f"{trajectory.reward:g}")
        return _Pair(task, trajectory, [Message("user", prompt)])

    def _reflect(self, pairs: list[_Pair], ctx: RolloutContext, counters: RolloutCounters) -> None:
        """Critiques: R³L's JSON reflection of every sample (paper) or free text on failures (reference)."""
        if self.variant == "paper":
            super()._reflect(pairs, ctx, counters)
            return
        failures = [p for p in pairs if not is_success(p.base.reward)]
        if not failures:
            return
        prompts = [ctx.chat.prompt_ids(p.reflection_messages) for p in failures]
        outputs = ctx.generate(prompts, self._params(self.reflection_sampling, 1), "reflection")
        for pair, (completion,) in zip(failures, outputs):
            counters.add("tokens_reflection", len(completion.token_ids))
            pair.reflection_response = ctx.chat.assistant_message(completion.token_ids, completion.logprobs)
            if not pair.reflection_response.content.strip():
                counters.add("invalid_reflections")
                counters.add("invalid_reflection_empty")

    def _triggers_retry(self, pair: _Pair) -> bool:
        """Paper: every valid critique, whatever outcome it reports. Reference: every non-empty critique."""
        if pair.base.info.get("error"):
            return False
        if self.variant == "paper":
            return pair.reflection is not None
        return pair.reflection_response is not None and bool(pair.reflection_response.content.strip())

    def _guidance(self, pair: _Pair) -> str:
        if self.variant == "paper":
            return super()._guidance(pair)
        return fill(self.refinement_template, critique=pair.reflection_response.content.strip())

    def _stats(self, pairs: list[_Pair], result: ExplorationResult, counters: RolloutCounters) -> dict[str, float]:
        """Base-sample statistics, critique and refinement counts, refinement success rate, sample kinds."""
        stats = base_stats([p.base.reward for p in pairs], counters)
        refinements = [t for p in pairs for t in p.retries]
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
