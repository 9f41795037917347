"""``CritiqueGRPOExplorer``: Critique-GRPO exploration with the policy as its own critic."""

from __future__ import annotations

from r3l_lightning.advantages import AdvantageMode
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, base_stats, is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.r3l import R3LExplorer, _Pair
from r3l_lightning.explore.records import pairs_record


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
            result.records.append(pairs_record(task, task_pairs, trajectories, samples))
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
