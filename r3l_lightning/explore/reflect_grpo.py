"""``ReflectGRPOExplorer``: Reflect-GRPO as the reference code intends it (``dapo/reflect_grpo_workflow.py``).

For every task (:meth:`ReflectGRPOExplorer.explore_groups`):

1. roll out N trajectories from the task's prompt; the first N/2 are plain samples, the other N/2 attempts;
2. reflect on each failed attempt (R < 1; R³L's JSON report);
3. a valid report that asks for a retry is followed by a retry FROM SCRATCH with the report as guidance in
   the system prompt;
4. the group is the N samples and each retry's distill copy (the original prompt, guidance removed): N to
   1.5·N samples, GRPO advantages over all of them, every assistant turn trainable; no SFT data.
"""

from __future__ import annotations

from typing import Literal

from r3l_lightning.advantages import AdvantageMode
from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters
from r3l_lightning.explore.r3l import R3LExplorer
from r3l_lightning.prompts import GUIDANCE_TEMPLATE, REFLECTION_SYSTEM_PROMPT


class ReflectGRPOExplorer(R3LExplorer):
    """Reflect-GRPO: GRPO whose failed attempts get one reflect-and-retry from scratch (steps: module docstring).

    The reflection and retry steps are R³L's, reflecting on failures only and retrying from turn 0.
    ``reflection_decoding``: as :class:`~r3l_lightning.explore.r3l.R3LExplorer`'s (``schema``, the default, or
    ``free``, the reference code's unconstrained text, whose invalid reports get no retry).
    """

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
        reflection_decoding: Literal["schema", "free"] = "schema",
        reflection_prompt: str = REFLECTION_SYSTEM_PROMPT,
        guidance_template: str = GUIDANCE_TEMPLATE,
        seed: int = 0,
    ) -> None:
        super().__init__(
            group_size=group_size, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            advantage=advantage, alpha=alpha, reflection_temperature=reflection_temperature,
            reflection_max_new_tokens=reflection_max_new_tokens, reflection_decoding=reflection_decoding,
            pivotal_credit=False, sft_rule="none",
            reflection_prompt=reflection_prompt, guidance_template=guidance_template, seed=seed,
        )

    def explore_groups(self, groups: list[TaskGroup], ctx: RolloutContext, counters: RolloutCounters) -> None:
        self.rollout(groups, self.group_size, ctx, counters)  # 1. N samples per task
        attempts = [a for g in groups for a in self.reflectable(g)]
        self.reflect(attempts, ctx, counters)  # 2. reflections on the failed attempts
        self.retry(attempts, ctx, counters)  # 3. guided retries from scratch
        for group in groups:  # 4. the N samples and the distilled retries
            self.make_group(ctx, group, [c for a in group.attempts for c in self.candidates(a)], counters)

    def reflectable(self, group: TaskGroup) -> list[Attempt]:
        """The group's attempts: its last N/2 samples (the first N/2 are plain)."""
        return group.attempts[self.group_size // 2 :]

    def reflects_on(self, attempt: Attempt) -> bool:
        return not is_success(attempt.base.reward)

    def retry_start(self, attempt: Attempt) -> int:
        return 0

    def stats(self, groups: list[TaskGroup], counters: RolloutCounters) -> dict[str, float]:
        return self.reflection_stats([a for g in groups for a in self.reflectable(g)], counters)
