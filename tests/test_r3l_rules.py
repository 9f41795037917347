"""R³L's rules where one plausible slip changes the data: SFT admission (paper / reference code), several
retries per base, no retry after an environment crash, the w/o-credit ablation, corrections trained as
the reference code trains them, and prompt overrides. Scripted engine, guessing environment."""

from __future__ import annotations

import json

import pytest

from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.prompts import REFLECTION_REQUEST
from scripted import GuessEnv, GuessTasks, ScriptedEngine

GUIDED = "previous attempt at this task had issues"  # in the default guidance template


def report(outcome: str = "failure", pivot: int | None = 0) -> str:
    return json.dumps({
        "trajectory_summary": "guessed", "root_cause_analysis": "why? guessed pear",
        "trajectory_outcome": outcome, "improvement_suggestion": None if outcome == "success" else "guess apple",
        "retry_from_step": pivot,
    })


def explore(chat, respond, env=None, rewards=None, group_size=2, **options):
    """One task, ``group_size // 2`` base trajectories; returns (result, engine)."""
    engine = ScriptedEngine(respond, chat.tokenizer, chat.tokenizer.eos_token_id)
    explorer = R3LExplorer(group_size=group_size, **options)
    result = explorer.explore([GuessTasks(1, rewards)[0]], RolloutContext(env or GuessEnv(max_turns=3), engine, chat))
    return result, engine


def responder(reflection: str, base: str | list[str], retry: str | list[str]):
    """Reflection prompts get ``reflection``; guided prompts the next of ``retry``; others the next of ``base``
    (a list is answered in turn, a string always)."""
    queues = {k: iter(v) if isinstance(v, list) else None for k, v in (("base", base), ("retry", retry))}

    def respond(prompt: str) -> str:
        if REFLECTION_REQUEST in prompt:
            return reflection
        key = "retry" if GUIDED in prompt else "base"
        return next(queues[key]) if queues[key] is not None else {"base": base, "retry": retry}[key]
    return respond


def pear_then(second: str, reflection: str):
    """Base episodes answer "pear", then ``second`` once told "'pear' is wrong"; guided prompts "apple"."""
    def respond(prompt: str) -> str:
        if REFLECTION_REQUEST in prompt:
            return reflection
        if GUIDED in prompt:
            return "apple"
        return second if "'pear' is wrong" in prompt else "pear"
    return respond


def trainable_text(chat, sample) -> str:
    return chat.tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


# ----- SFT admission ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_a_retry_that_only_ties_its_base_is_not_a_correction(tiny_chat, rule):
    # base "pear" scores .5, retry "apple" scores .5: R' = R, so R' > R fails (and R' < 1 for the reference)
    result, _ = explore(tiny_chat, responder(report(), "pear", "apple"), rewards={"pear": 0.5, "apple": 0.5},
                        sft_rule=rule)
    assert result.stats["retry_trigger_rate"] == 1.0
    assert result.sft == []


def test_reference_rule_also_admits_a_success_in_fewer_turns(tiny_chat):
    # base: "pear" (wrong) then "apple": R = 1 in 2 turns; reflection: inefficient, retry from step 0;
    # retry: "apple" at once, R' = 1 in 1 turn. Paper: R' > R fails. Reference (ALFWorld R3L_workflow.py
    # l. 319-321): (R' > R and R' >= 1) or (R' >= 1 and 1 < 2 steps) → admitted
    for rule, kinds in (("paper", []), ("reference", ["sft_reflect", "sft_retry"])):
        result, _ = explore(tiny_chat, pear_then("apple", report("success_but_inefficient", 0)), sft_rule=rule)
        assert result.stats["base_success_rate"] == 1.0 and result.stats["retry_trigger_rate"] == 1.0
        assert [s.kind for s in result.sft] == kinds


def test_reference_rule_needs_strictly_fewer_turns(tiny_chat):
    # the same base (pear, apple: 2 turns), but the retry restarts at step 1: it replays "pear" and answers
    # "apple" under guidance, R' = 1 in 2 turns, not fewer → not admitted
    result, _ = explore(tiny_chat, pear_then("apple", report("success_but_inefficient", 1)), sft_rule="reference")
    assert result.stats["retry_trigger_rate"] == 1.0 and result.stats["mean_pivot"] == 1.0
    assert result.sft == []


# ----- several retries per base ----------------------------------------------------------------------


def test_best_retry_selection_keeps_the_first_of_equally_good_retries(tiny_chat):
    # two retries of the one base: "apple" then "fig", both R' = 1; "best" keeps the FIRST
    result, engine = explore(tiny_chat, responder(report(), "pear", ["apple", "fig"]), GuessEnv(max_turns=1),
                             rewards={"apple": 1.0, "fig": 1.0}, retries_per_base=2, retry_selection="best")
    assert engine.calls == [1, 1, 2]  # base, reflection, both retries in one batch
    group = result.groups[0]
    assert [s.kind for s in group] == ["base", "distill"]
    assert trainable_text(tiny_chat, group[1]) == "apple<|im_end|>"
    assert [trainable_text(tiny_chat, s) for s in result.sft if s.kind == "sft_retry"] == ["apple<|im_end|>"]


def test_all_retry_selection_trains_every_retry(tiny_chat):
    # the paper's retry-count study: both retries' distill samples join the group, each correction is SFT data
    result, _ = explore(tiny_chat, responder(report(), "pear", ["apple", "kiwi"]), GuessEnv(max_turns=1),
                        rewards={"apple": 1.0}, retries_per_base=2)
    group = result.groups[0]
    assert [s.kind for s in group] == ["base", "distill", "distill"]
    assert [trainable_text(tiny_chat, s) for s in group[1:]] == ["apple<|im_end|>", "kiwi<|im_end|>"]
    # rewards [0, 1, 0]: R̄ = 1/3, σ = sqrt((1/9 + 4/9 + 1/9)/2) = sqrt(1/3) = .57735; R_max → α = 3,
    # the others (0 - 1/3)/.57735 = -.57735
    assert [s.advantage for s in group] == pytest.approx([-0.5773503, 3.0, -0.5773503], abs=1e-5)
    # only "apple" improved: one reflection sample and one retry sample
    assert sorted(s.kind for s in result.sft) == ["sft_reflect", "sft_retry"]
    assert result.stats["retry_improvement_rate"] == 0.5


def test_retry_selection_is_validated(tiny_chat):
    with pytest.raises(ValueError, match="retry_selection must be one of all, best, got 'last'"):
        R3LExplorer(retry_selection="last")
    with pytest.raises(ValueError, match="retries_per_base must be >= 1"):
        R3LExplorer(retries_per_base=0)


# ----- no retry after an environment crash --------------------------------------------------------------


def test_no_retry_after_the_environment_crashed_the_base_episode(tiny_chat):
    # base: "pear" (wrong), then "crash" (the simulator raises): 2 turns, marked with an error. The reflection
    # names step 1, inside [0, 1], so only the crash can stop the retry.
    result, engine = explore(tiny_chat, pear_then("crash", report("failure", 1)), GuessEnv(max_turns=3))
    assert engine.calls == [1, 1, 1]  # two base turns and the reflection; no retry generation
    assert result.stats["env_errors"] == 1 and result.stats["valid_reflection_rate"] == 1.0
    assert result.stats["retry_trigger_rate"] == 0.0
    assert [s.kind for s in result.groups[0]] == ["base"] and result.sft == []


# ----- w/o pivotal credit -------------------------------------------------------------------------------


def test_without_pivotal_credit_the_guided_retry_is_trainable_from_its_first_turn(tiny_chat):
    # base: pear, pear, pear (R = 0); reflection: retry from step 1; retry: replays "pear", answers "apple"
    respond = responder(report("failure", 1), "pear", "apple")
    for credit, expected in ((True, "apple<|im_end|>"), (False, "pear<|im_end|>apple<|im_end|>")):
        result, _ = explore(tiny_chat, respond, pivotal_credit=credit)
        (retry,) = [s for s in result.sft if s.kind == "sft_retry"]
        assert trainable_text(tiny_chat, retry) == expected


# ----- corrections as the reference code trains them ------------------------------------------------


def test_reinforce_corrections_are_one_sample_groups_with_advantage_one(tiny_chat):
    # base "pear" (R = 0), retry "apple" (R' = 1): a correction. Its reflection and guided retry become
    # RL samples of reward 1 in groups of their own: r3l_reference gives a lone R = 1 baseline 0 → 1.0
    result, _ = explore(tiny_chat, responder(report(), "pear", "apple"), GuessEnv(max_turns=1),
                        advantage="r3l_reference", sft_rule="reference", correction_loss="reinforce")
    assert result.sft == []
    (group,) = result.groups
    assert [s.kind for s in group] == ["base", "distill", "reflection", "retry"]
    # base ∪ distill, rewards [0, 1]: R̄ = .5; base s = -.5 < 0 → -.5; distill R ≥ 1 → 1
    assert [s.advantage for s in group] == pytest.approx([-0.5, 1.0, 1.0, 1.0])
    reflection, retry = group[2], group[3]
    assert json.loads(trainable_text(tiny_chat, reflection).removesuffix("<|im_end|>"))["retry_from_step"] == 0
    assert trainable_text(tiny_chat, retry) == "apple<|im_end|>"
    assert GUIDED in tiny_chat.tokenizer.decode(retry.input_ids)  # the guided retry, guidance in context


def test_reinforce_corrections_need_an_advantage_that_rewards_a_lone_success():
    # the paper's r3l gives a group of one 0: the corrections would never train
    with pytest.raises(ValueError, match="correction_loss='reinforce'.*advantage 'r3l'.*r3l_reference"):
        R3LExplorer(correction_loss="reinforce")
    R3LExplorer(correction_loss="reinforce", advantage="grpo", singleton="zero_baseline")  # R/(1 + eps) ≠ 0


# ----- prompts ------------------------------------------------------------------------------------------


def test_prompts_are_overridable_and_checked(tiny_chat):
    seen = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        if "Diagnose tersely." in prompt:
            return report()
        return "apple" if "LESSONS:" in prompt else "pear"

    result, _ = explore(tiny_chat, script, GuessEnv(max_turns=1), reflection_prompt="Diagnose tersely. JSON only.",
                        guidance_template="LESSONS: {report}")
    assert any("LESSONS:" in p and '"retry_from_step": 0' in p for p in seen)  # the report filled in
    assert result.groups[0][1].kind == "distill"
    with pytest.raises(ValueError, match=r"guidance_template must contain \{report\}"):
        R3LExplorer(guidance_template="Try again.")
