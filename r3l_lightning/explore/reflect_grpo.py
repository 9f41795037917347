"""``ReflectGRPOExplorer``: Reflect-GRPO as the reference code intends it (``dapo/reflect_grpo_workflow.py``)."""

from __future__ import annotations

from r3l_lightning.advantages import AdvantageMode
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.base import ExplorationResult, base_stats
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.r3l import R3LExplorer
from r3l_lightning.prompts import GUIDANCE_TEMPLATE, REFLECTION_SYSTEM_PROMPT


class ReflectGRPOExplorer(R3LExplorer):
    """Reflect-GRPO: GRPO whose failed attempts get one reflect-and-retry from scratch.

    Per task, ``group_size`` = N samples from scratch:

    1. the first N/2 are plain samples;
    2. each of the other N/2 (the attempts) that fails (R < 1) gets a reflection (R³L's JSON report);
    3. a valid reflection that asks for a retry is followed by a retry FROM SCRATCH with the report as
       guidance in the system prompt;
    4. the retry's distill copy (the original prompt, guidance removed) joins the group, so a group holds
       N to 1.5·N samples; GRPO advantages over all of them, every assistant turn trainable, no SFT data.

    The reflection and retry steps are R³L's (reflection on failures only, pivot 0).
    """

    reflect_on = "failures"
    retry_from_scratch = True

    def __init__(
        self,
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        advantage: AdvantageMode = "grpo",
        alpha: float = 3.0,
        reflection_temperature: float = 0.7,
        reflection_max_new_tokens: int = 512,
        reflection_prompt: str = REFLECTION_SYSTEM_PROMPT,
        guidance_template: str = GUIDANCE_TEMPLATE,
        seed: int = 0,
    ) -> None:
        super().__init__(
            group_size=group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            advantage=advantage, alpha=alpha, reflection_temperature=reflection_temperature,
            reflection_max_new_tokens=reflection_max_new_tokens, pivotal_credit=False, sft_rule="none",
            reflection_prompt=reflection_prompt, guidance_template=guidance_template, seed=seed,
        )

    def explore(self, tasks: list[Task], ctx: RolloutContext) -> ExplorationResult:
        self._calls += 1
        counters = RolloutCounters()
        plain = self.group_size // 2
        samples = self.rollout(tasks, self.group_size, ctx, counters)
        attempts = [[self._pair(task, t, ctx) for t in group[plain:]] for task, group in zip(tasks, samples)]
        pairs = [pair for task_pairs in attempts for pair in task_pairs]
        self._reflect(pairs, ctx, counters)
        self._retry(pairs, ctx, counters)
        result = ExplorationResult()
        for task, group, task_pairs in zip(tasks, samples, attempts):
            trajectories = group[:plain]
            for pair in task_pairs:
                trajectories += [pair.base] + [self._distill(pair, retry) for retry in pair.retries]
            result.groups.append(self.make_group(ctx, trajectories, [0] * len(trajectories), task.task_id, counters))
        result.stats = self._stats(pairs, result, counters)
        result.stats.update(base_stats([t.reward for group in samples for t in group], counters))
        return result
