"""Reflect-GRPO as the reference code intends it (dapo/reflect_grpo_workflow.py): N/2 plain samples, N/2
attempts; a failed attempt's retry from scratch joins the group WITHOUT its guidance (up to 1.5·N)."""

from __future__ import annotations

import json

import pytest

from r3l_lightning.explore import ReflectGRPOExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.prompts import REFLECTION_REQUEST
from scripted import GuessEnv, GuessTasks, ScriptedEngine

GUIDED = "previous attempt at this task had issues"


def report(outcome: str = "failure", pivot: int | None = 0) -> str:
    return json.dumps({
        "trajectory_summary": "guessed", "root_cause_analysis": "why? guessed pear",
        "trajectory_outcome": outcome, "improvement_suggestion": None if outcome == "success" else "guess apple",
        "retry_from_step": pivot,
    })


def run(chat, base_answers, reflection=report(), max_turns=1, group_size=4, seen=None):
    """One task; base samples answer ``base_answers`` in turn (first turn), later turns "pear", guided
    prompts "apple". Prompts are appended to ``seen``."""
    answers = iter(base_answers)

    def respond(prompt: str) -> str:
        if seen is not None:
            seen.append(prompt)
        if REFLECTION_REQUEST in prompt:
            return reflection
        if GUIDED in prompt:
            return "apple"
        return "pear" if "is wrong" in prompt else next(answers)

    engine = ScriptedEngine(respond, chat.tokenizer, chat.tokenizer.eos_token_id)
    result = ReflectGRPOExplorer(group_size=group_size).explore(
        [GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=max_turns), engine, chat))
    return result, engine


def text(chat, sample, trainable_only=False) -> str:
    return chat.tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m or not trainable_only])


def test_failed_attempts_add_their_distilled_retries_to_a_group_of_one_and_a_half_n(tiny_chat):
    result, engine = run(tiny_chat, ["pear"] * 4)
    assert engine.calls == [4, 2, 2]  # N samples; reflections on the N/2 attempts only; their retries
    (group,) = result.groups
    assert [s.kind for s in group] == ["base", "base", "base", "distill", "base", "distill"]  # 6 = 1.5·N
    for distill in (group[3], group[5]):
        assert text(tiny_chat, distill, trainable_only=True) == "apple<|im_end|>"
        assert GUIDED not in text(tiny_chat, distill)  # guidance removed: the original prompt
        cut = next(t for t, m in enumerate(distill.loss_mask) if m)
        assert distill.input_ids[:cut] == group[0].input_ids[:cut]
    # GRPO over [0, 0, 0, 1, 0, 1]: R̄ = 1/3; σ² = (4·(1/3)² + 2·(2/3)²)/5 = (12/9)/5 = 4/15, σ = .51639778
    # → A = -(1/3)/σ = -.64549722, (2/3)/σ = 1.29099445
    low, high = -0.6454972, 1.2909944
    assert [s.advantage for s in group] == pytest.approx([low, low, low, high, low, high], abs=1e-5)
    assert result.sft == []
    assert result.stats["samples_base"] == 4 and result.stats["samples_distill"] == 2
    assert result.stats["base_success_rate"] == 0.0


def test_plain_samples_and_successful_attempts_are_not_reflected_on(tiny_chat):
    # plain: pear, pear (failures, but plain); attempts: apple (success), pear (failure) → one reflection
    result, engine = run(tiny_chat, ["pear", "pear", "apple", "pear"])
    assert engine.calls == [4, 1, 1]
    assert [s.kind for s in result.groups[0]] == ["base", "base", "base", "base", "distill"]


def test_retries_start_from_scratch_with_the_guidance_in_the_system_prompt(tiny_chat):
    # two-turn attempts (pear, pear); the report names step 1, but Reflect-GRPO always restarts at step 0
    seen = []
    result, _ = run(tiny_chat, ["pear"] * 4, reflection=report("failure", 1), max_turns=2, seen=seen)
    guided = [p for p in seen if GUIDED in p]
    assert len(guided) == 2 and all(GUIDED in p.split("<|im_end|>")[0] for p in guided)  # in the system prompt
    assert all("is wrong" not in p for p in guided)  # at step 0: nothing replayed
    (group,) = result.groups
    distill = group[3]
    assert text(tiny_chat, distill, trainable_only=True) == "apple<|im_end|>"  # one fresh turn, all trainable
    assert distill.num_trainable_tokens == distill.num_assistant_tokens
    assert all(s.num_trainable_tokens == s.num_assistant_tokens for s in group)  # no pivot mask anywhere
    assert result.stats["mean_pivot"] == 0.0


def test_a_success_report_or_an_invalid_one_triggers_no_retry(tiny_chat):
    success = json.dumps({"trajectory_summary": "ok", "root_cause_analysis": None, "trajectory_outcome": "success",
                          "improvement_suggestion": None, "retry_from_step": None})
    for reflection in (success, "no json here"):
        result, engine = run(tiny_chat, ["pear"] * 4, reflection=reflection)
        assert engine.calls == [4, 2]
        assert [s.kind for s in result.groups[0]] == ["base"] * 4
