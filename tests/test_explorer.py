"""R³L explorer branches with a scripted engine: retry, distill, masks, SFT admission, failures; Critique-GRPO."""

from __future__ import annotations

import json
import re

import pytest

from r3l_lightning.callbacks.evaluation import evaluate_tasks
from r3l_lightning.engines.base import Completion, SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.episodes import RolloutContext, completion_stats
from r3l_lightning.explore import CritiqueGRPOExplorer, DAPOExplorer, GroupExplorer, R3LExplorer
from r3l_lightning.explore.dapo import overlong_penalty
from scripted import GuessEnv, GuessTasks, ScriptedEngine

REFLECTION = {
    "trajectory_summary": "guessed pear three times",
    "root_cause_analysis": "why wrong? kept the same guess; why? ignored feedback",
    "trajectory_outcome": "failure",
    "improvement_suggestion": "change the guess after negative feedback",
    "retry_from_step": 1,
}


def script(reflection: str, retry_answer: str = "apple", base_answer: str = "pear"):
    def respond(prompt: str) -> str:
        if "Write the JSON diagnosis" in prompt:
            return reflection
        if "previous attempt at this task had issues" in prompt:
            return retry_answer
        return base_answer
    return respond


def run(chat, reflection, env=None, tasks=2, **kwargs):
    env = env or GuessEnv(max_turns=3)
    engine = ScriptedEngine(script(reflection, kwargs.pop("retry_answer", "apple")), chat.tokenizer, chat.tokenizer.eos_token_id)
    explorer = R3LExplorer(group_size=4, **kwargs)
    source = GuessTasks(tasks)
    result = explorer.explore([source[i] for i in range(tasks)], RolloutContext(env, engine, chat))
    return result, engine


def _text(chat, sample, trainable_only=False):
    ids = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m or not trainable_only]
    return chat.tokenizer.decode(ids)


def test_valid_reflection_retries_from_pivot_and_builds_distill_and_sft(tiny_chat):
    result, engine = run(tiny_chat, json.dumps(REFLECTION))
    # all episodes of a phase are stepped together: 3 base turns, 1 reflection call, 1 retry turn
    assert engine.calls == [4, 4, 4, 4, 4]
    assert len(result.groups) == 2
    group = result.groups[0]
    assert [s.kind for s in group] == ["base", "distill", "base", "distill"]
    # rewards [0, 1, 0, 1]: mean .5, unbiased std sqrt(1/3); R_max -> alpha = 3, others (0-.5)/.57735
    assert [s.advantage for s in group] == pytest.approx([-0.8660254, 3.0, -0.8660254, 3.0], abs=1e-5)
    base, distill = group[0], group[1]
    # pivot 1: turn 0 ("pear") is context only in both base and distill
    assert _text(tiny_chat, base, trainable_only=True).count("pear") == 2  # turns 1 and 2
    assert _text(tiny_chat, distill, trainable_only=True) == "apple<|im_end|>"
    # the distill sample is the ORIGINAL prefix + retry suffix, guidance removed
    assert "previous attempt" not in _text(tiny_chat, distill)
    assert "pear" in _text(tiny_chat, distill)
    kinds = sorted(s.kind for s in result.sft)
    assert kinds == ["sft_reflect"] * 4 + ["sft_retry"] * 4
    retry_sft = next(s for s in result.sft if s.kind == "sft_retry")
    assert "previous attempt at this task had issues" in _text(tiny_chat, retry_sft)  # guidance IS in the input
    assert _text(tiny_chat, retry_sft, trainable_only=True) == "apple<|im_end|>"
    reflect_sft = next(s for s in result.sft if s.kind == "sft_reflect")
    assert json.loads(_text(tiny_chat, reflect_sft, trainable_only=True).removesuffix("<|im_end|>")) == REFLECTION
    stats = result.stats
    assert stats["valid_reflection_rate"] == 1.0
    assert stats["retry_trigger_rate"] == 1.0
    assert stats["retry_improvement_rate"] == 1.0
    assert stats["mean_pivot"] == 1.0
    assert stats["base_success_rate"] == 0.0
    assert stats["samples_distill"] == 4 and stats["samples_sft_retry"] == 4


def test_distill_prefix_is_token_identical_to_base_prefix(tiny_chat):
    result, _ = run(tiny_chat, json.dumps(REFLECTION))
    base, distill = result.groups[0][0], result.groups[0][1]
    first_trainable = lambda s: next(t for t, m in enumerate(s.loss_mask) if m)  # noqa: E731
    cut = first_trainable(distill)
    assert first_trainable(base) == cut
    assert distill.input_ids[:cut] == base.input_ids[:cut]


def test_pivot_zero_puts_guidance_in_the_system_prompt(tiny_chat):
    result, _ = run(tiny_chat, json.dumps(dict(REFLECTION, retry_from_step=0)))
    retry_sft = next(s for s in result.sft if s.kind == "sft_retry")
    text = _text(tiny_chat, retry_sft)
    system = text.split("<|im_end|>")[0]
    assert "Play the guessing game" in system and "previous attempt at this task had issues" in system
    distill = result.groups[0][1]
    assert _text(tiny_chat, distill, trainable_only=True) == "apple<|im_end|>"
    assert sum(distill.loss_mask) == sum(retry_sft.loss_mask)


@pytest.mark.parametrize(
    "reflection, reason",
    [
        ("I think it went badly", "no_json"),
        ("{not json}", "invalid_json"),
        (json.dumps({k: v for k, v in REFLECTION.items() if k != "root_cause_analysis"}), "missing_field"),
        (json.dumps(dict(REFLECTION, trajectory_outcome="meh")), "unknown_outcome"),
        (json.dumps(dict(REFLECTION, retry_from_step=3)), "pivot_out_of_range"),  # K = 3 turns
        (json.dumps(dict(REFLECTION, retry_from_step=-1)), "pivot_out_of_range"),
        (json.dumps(dict(REFLECTION, retry_from_step="1")), "pivot_not_integer"),
    ],
)
def test_invalid_reflections_are_counted_and_skip_the_retry(tiny_chat, reflection, reason):
    result, engine = run(tiny_chat, "Here: " + reflection + " done")
    assert engine.calls == [4, 4, 4, 4]  # no retry phase generation
    assert result.stats["valid_reflection_rate"] == 0.0
    assert result.stats["invalid_reflections"] == 4
    assert result.stats[f"invalid_reflection_{reason}"] == 4
    group = result.groups[0]
    assert [s.kind for s in group] == ["base", "base"]
    assert [s.advantage for s in group] == [0.0, 0.0]  # all rewards equal: no RL signal
    assert result.sft == []


def test_success_reflection_on_success_is_not_retried_and_kept_only_in_reference_variant(tiny_chat):
    success = json.dumps(dict(REFLECTION, trajectory_outcome="success", improvement_suggestion=None, retry_from_step=None))
    env = GuessEnv(max_turns=3)
    for keep in (False, True):
        engine = ScriptedEngine(script(success, base_answer="apple"), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
        explorer = R3LExplorer(group_size=4, keep_success_reflections=keep)
        result = explorer.explore([GuessTasks(1)[0]], RolloutContext(env, engine, tiny_chat))
        assert result.stats["retry_trigger_rate"] == 0.0
        assert [s.kind for s in result.sft] == (["sft_reflect", "sft_reflect"] if keep else [])


def test_replay_mismatch_skips_the_retry(tiny_chat):
    result, _ = run(tiny_chat, json.dumps(REFLECTION), env=GuessEnv(max_turns=3, nondeterministic=True))
    assert result.stats["replay_mismatches"] == 4
    assert result.stats["retry_trigger_rate"] == 1.0
    assert all(s.kind == "base" for s in result.groups[0])


def test_sft_admission_paper_versus_reference(tiny_chat):
    env = GuessEnv(max_turns=3)
    tasks = GuessTasks(1, {"apple": 0.5})  # a partial improvement: R' = .5 > R = 0, but R' < 1
    for rule, admitted in (("paper", 4), ("reference", 0)):
        engine = ScriptedEngine(script(json.dumps(REFLECTION)), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
        result = R3LExplorer(group_size=4, sft_rule=rule).explore([tasks[0]], RolloutContext(env, engine, tiny_chat))
        assert len(result.sft) == admitted


def test_environment_crash_costs_one_episode(tiny_chat):
    env = GuessEnv(max_turns=3)
    engine = ScriptedEngine(lambda p: "crash", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = GroupExplorer(group_size=3).explore([GuessTasks(1)[0]], RolloutContext(env, engine, tiny_chat))
    assert result.stats["env_errors"] == 3
    assert [s.advantage for s in result.groups[0]] == [0.0, 0.0, 0.0]


def test_without_pivotal_credit_every_turn_is_trainable(tiny_chat):
    result, _ = run(tiny_chat, json.dumps(REFLECTION), pivotal_credit=False)
    base, distill = result.groups[0][0], result.groups[0][1]
    assert _text(tiny_chat, base, trainable_only=True).count("pear") == 3
    assert _text(tiny_chat, distill, trainable_only=True) == "pear<|im_end|>apple<|im_end|>"


def test_drop_uniform_groups(tiny_chat):
    engine = ScriptedEngine(lambda p: "pear", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    ctx = RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat)
    dropped = DAPOExplorer(group_size=3, overlong_penalty=0.0).explore([GuessTasks(1)[0]], ctx)
    assert dropped.groups == [] and dropped.stats["groups_dropped"] == 1


@pytest.mark.parametrize(
    "length, expected",
    # max 512, buffer 400 → L_exp = 112: ≤ 112 → 0; (112 - L)/400 up to 512; beyond 512 → -1
    [(0, 0.0), (112, 0.0), (113, -0.0025), (312, -0.5), (512, -1.0), (513, -1.0), (5000, -1.0)],
)
def test_soft_overlong_penalty_by_hand(length, expected):
    assert overlong_penalty(length, 512, 400, 1.0) == pytest.approx(expected)
    assert overlong_penalty(length, 512, 400, 0.5) == pytest.approx(expected / 2)


def test_overlong_penalty_is_added_to_the_reward_of_long_responses(tiny_chat):
    short, long = "apple", "apple apple apple apple"
    a, b = (len(tiny_chat.tokenizer(w, add_special_tokens=False)["input_ids"]) + 1 for w in (short, long))  # + <|im_end|>
    answers = iter([short, long])
    engine = ScriptedEngine(lambda p: next(answers), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    explorer = DAPOExplorer(group_size=2, advantage="mean_baseline", drop_uniform_groups=False, overlong_penalty=0.5,
                            overlong_max_tokens=b, overlong_buffer_tokens=b - a)
    result = explorer.explore([GuessTasks(1, {short: 1.0, long: 1.0})[0]],
                              RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat))
    # L_exp = b - (b - a) = a: the short answer gets 0, the long one (L = b = L_max) (a - b)/(b - a)·.5 = -.5;
    # rewards [1, .5] → R̄ = .75 → [.25, -.25]
    assert [s.advantage for s in result.groups[0]] == pytest.approx([0.25, -0.25])


def test_overlong_length_after_the_first_prompt_counts_observations_too(tiny_chat):
    # two turns, "pear" (wrong) then "apple"; L_max = the two responses' tokens together, buffer 1.
    # longest response ≤ L_max - 1 → no penalty; everything after the first prompt (both responses, the
    # observation and the chat template's tokens) > L_max → -1 (the reference code's measure)
    p, a = (len(tiny_chat.tokenizer(w, add_special_tokens=False)["input_ids"]) + 1 for w in ("pear", "apple"))
    script = lambda prompt: "apple" if "'pear' is wrong" in prompt else "pear"  # noqa: E731
    for measure, advantage in (("longest_response", 1.0), ("after_first_prompt", 0.0)):
        engine = ScriptedEngine(script, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
        explorer = DAPOExplorer(group_size=1, advantage="none", drop_uniform_groups=False, overlong_penalty=1.0,
                                overlong_max_tokens=p + a, overlong_buffer_tokens=1, overlong_length=measure)
        result = explorer.explore([GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=2), engine, tiny_chat))
        assert [s.advantage for s in result.groups[0]] == [advantage]  # R = 1 plus the penalty


def test_overlong_options_are_checked():
    with pytest.raises(ValueError, match="0 < overlong_buffer_tokens <= overlong_max_tokens"):
        DAPOExplorer(overlong_penalty=1.0, overlong_buffer_tokens=0)  # no buffer
    with pytest.raises(ValueError, match="overlong_length must be"):
        DAPOExplorer(overlong_length="total")


def test_raft_keeps_only_successes_as_sft(tiny_chat):
    from r3l_lightning.explore import RAFTExplorer

    answers = iter(["apple", "pear", "pear", "apple"])
    engine = ScriptedEngine(lambda p: next(answers), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = RAFTExplorer(group_size=4).explore([GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat))
    assert result.groups == []
    assert [s.kind for s in result.sft] == ["sft_success", "sft_success"]
    assert all(_text(tiny_chat, s, trainable_only=True) == "apple<|im_end|>" for s in result.sft)


# ----- Critique-GRPO -------------------------------------------------------------------------------

CRITIQUE = dict(REFLECTION, retry_from_step=0)
FRUIT = {"apple": 1.0, "fig": 1.0, "plum": 0.5}
GUIDED = "previous attempt at this task had issues"


def critique_script(base_answers: list[str], suggestions: dict[str, str | None]):
    """Base attempts answer ``base_answers`` in turn; the critique of an attempt that answered w suggests
    ``suggestions[w]`` (no JSON, i.e. an invalid critique, when None); a refinement answers the suggestion."""
    queue = iter(base_answers)

    def respond(prompt: str) -> str:
        if "Write the JSON diagnosis" in prompt:
            suggestion = suggestions[re.search(r"Response:\n(\w+)", prompt).group(1)]
            return json.dumps(dict(CRITIQUE, improvement_suggestion=f"switch to {suggestion}")) if suggestion else "hm"
        if GUIDED in prompt:
            return re.search(r"switch to (\w+)", prompt).group(1)
        return next(queue)
    return respond


def critique_run(chat, base_answers, suggestions, tasks=1, group_size=3):
    engine = ScriptedEngine(critique_script(base_answers, suggestions), chat.tokenizer, chat.tokenizer.eos_token_id)
    source = GuessTasks(tasks, FRUIT)
    result = CritiqueGRPOExplorer(group_size=group_size).explore(
        [source[i] for i in range(tasks)], RolloutContext(GuessEnv(max_turns=1), engine, chat))
    return result, engine


# rewards [0, .5, 0, 1] or [0, 0, .5, 1]: mean .375, deviations -.375, .125, .625; unbiased
# σ = sqrt((2·.140625 + .015625 + .390625)/3) = sqrt(.22916667) = .47871355
# → A = -.375/σ = -.78334945, .125/σ = .26111648, .625/σ = 1.30558242
LOW, MID, HIGH = -0.78334945, 0.26111648, 1.30558242


def test_critique_grpo_keeps_the_best_refinement_per_task_without_its_critique(tiny_chat):
    # task 0: pear, plum, pear (R = 0, .5, 0); refinements plum (.5), apple (1), plum (.5) → apple, the 2nd
    # task 1: kiwi, pear, plum (R = 0, 0, .5); refinements fig (1), plum (.5), apple (1) → fig: first of the tie
    suggestions = {"pear": "plum", "plum": "apple", "kiwi": "fig"}
    result, engine = critique_run(tiny_chat, ["pear", "plum", "pear", "kiwi", "pear", "plum"], suggestions, tasks=2)
    assert engine.calls == [6, 6, 6]  # N base samples, N critiques, N refinements per task, each phase batched
    assert len(result.groups) == 2
    for group, kept in zip(result.groups, ("apple", "fig")):
        assert [s.kind for s in group] == ["base", "base", "base", "refinement"]
        refinement = group[-1]
        assert _text(tiny_chat, refinement, trainable_only=True) == f"{kept}<|im_end|>"
        text = _text(tiny_chat, refinement)
        assert GUIDED not in text and "switch to" not in text  # the ORIGINAL prompt: no critique
        cut = next(t for t, m in enumerate(refinement.loss_mask) if m)
        assert refinement.input_ids[:cut] == group[0].input_ids[:cut]  # token-identical prompt to a base sample
    assert [s.advantage for s in result.groups[0]] == pytest.approx([LOW, MID, LOW, HIGH], abs=1e-5)
    assert [s.advantage for s in result.groups[1]] == pytest.approx([LOW, LOW, MID, HIGH], abs=1e-5)
    assert result.sft == []
    stats = result.stats
    assert (stats["critiques"], stats["invalid_critiques"], stats["refinements"]) == (6, 0, 6)
    assert stats["refinement_success_rate"] == 0.5  # apple, fig, apple: 3 of the 6 refinements score 1
    assert (stats["samples_base"], stats["samples_refinement"]) == (6, 2)
    assert stats["base_success_rate"] == 0.0


def test_critique_grpo_refinement_mask_covers_every_assistant_turn(tiny_chat):
    def respond(prompt: str) -> str:
        if "Write the JSON diagnosis" in prompt:
            return json.dumps(dict(CRITIQUE, improvement_suggestion="switch to apple"))
        if GUIDED in prompt:
            return "apple" if "is wrong" in prompt else "kiwi"  # a two-turn refinement
        return "pear"

    engine = ScriptedEngine(respond, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = CritiqueGRPOExplorer(group_size=3).explore(
        [GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=2), engine, tiny_chat))
    (group,) = result.groups
    refinement = group[-1]
    assert _text(tiny_chat, refinement, trainable_only=True) == "kiwi<|im_end|>apple<|im_end|>"
    assert refinement.num_trainable_tokens == refinement.num_assistant_tokens
    assert GUIDED not in _text(tiny_chat, refinement)
    assert all(_text(tiny_chat, s, trainable_only=True) == "pear<|im_end|>pear<|im_end|>" for s in group[:3])
    # rewards [0, 0, 0, 1]: mean .25, σ = sqrt((3·.0625 + .5625)/3) = .5 → [-.5, -.5, -.5, 1.5]
    assert [s.advantage for s in group] == pytest.approx([-0.5, -0.5, -0.5, 1.5], abs=1e-5)


def test_invalid_critiques_are_counted_and_skip_their_refinement(tiny_chat):
    result, engine = critique_run(tiny_chat, ["pear", "plum", "pear"], {"pear": None, "plum": "apple"})
    assert engine.calls == [3, 3, 1]  # one refinement: the valid critique's
    stats = result.stats
    assert (stats["critiques"], stats["invalid_critiques"], stats["invalid_reflection_no_json"]) == (3, 2, 2)
    assert (stats["refinements"], stats["refinement_success_rate"]) == (1, 1.0)
    (group,) = result.groups
    assert [s.kind for s in group] == ["base", "base", "base", "refinement"]
    assert [s.advantage for s in group] == pytest.approx([LOW, MID, LOW, HIGH], abs=1e-5)
    # no valid critique at all: the group is the N samples alone
    result, engine = critique_run(tiny_chat, ["pear", "plum", "pear"], {"pear": None, "plum": None})
    assert engine.calls == [3, 3]
    assert [s.kind for s in result.groups[0]] == ["base"] * 3
    assert (result.stats["refinements"], result.stats["samples_refinement"]) == (0, 0)
    # rewards [0, .5, 0]: mean 1/6, σ = sqrt((1/36 + 4/36 + 1/36)/2) = sqrt(1/12) = .28867513
    # → A = -(1/6)/σ = -.57735027, (1/3)/σ = 1.15470054
    assert [s.advantage for s in result.groups[0]] == pytest.approx([-0.57735027, 1.15470054, -0.57735027], abs=1e-5)


def test_engine_calls_per_phase_follow_the_episode_structure(tiny_chat):
    def respond(prompt: str) -> str:
        if "Write the JSON diagnosis" in prompt:  # pivot 1 after a wrong guess, else 0
            return json.dumps(dict(REFLECTION, retry_from_step=1 if "is wrong" in prompt else 0))
        return "apple"

    engine = ScriptedEngine(respond, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    ctx = RolloutContext(GuessEnv(max_turns=3), engine, tiny_chat)
    # "apple" wins task a at turn 1 and is wrong for task b at all 3 turns
    tasks = [Task("a", {"rewards": {"apple": 1.0}}), Task("b", {"rewards": {"kiwi": 1.0}})]
    R3LExplorer(group_size=2).explore(tasks, ctx)  # one base trajectory per task
    # base: turn 1 of a and b, then turns 2 and 3 of b; one reflection call for both; retries: a from turn 0
    # (1 turn) together with b from its pivot 1, then b's turn 3
    assert engine.calls == [2, 1, 1, 2, 2, 1]
    assert ctx.call_stats() == {"engine_calls": 6.0, "engine_calls_base": 3.0, "engine_calls_reflection": 1.0,
                                "engine_calls_retry": 2.0}
    eval_ctx = RolloutContext(GuessEnv(max_turns=3), engine, tiny_chat)
    evaluate_tasks(eval_ctx, tasks, SamplingParams(), repeats=2)  # 2 × a end at turn 1, 2 × b run 3 turns
    assert engine.calls[6:] == [4, 2, 2]
    assert eval_ctx.call_stats() == {"engine_calls": 3.0, "engine_calls_eval": 3.0}


def test_generation_totals_count_lengths_and_clipped_completions_per_phase(tiny_chat):
    tokenizer = tiny_chat.tokenizer

    class ClippingEngine(ScriptedEngine):
        """Answers "apple" (+ end of turn); a call with one prompt gets "kiwi kiwi kiwi", cut at the budget."""

        def generate(self, prompts, params, constraints=None):
            if len(prompts) > 1:
                return super().generate(prompts, params, constraints)
            ids = tokenizer("kiwi kiwi kiwi", add_special_tokens=False)["input_ids"]
            return [[Completion(ids, [-1.0] * len(ids), "length")]]

    engine = ClippingEngine(lambda prompt: "apple", tokenizer, tokenizer.eos_token_id)
    ctx = RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat)
    evaluate_tasks(ctx, [Task("a", {"rewards": {"apple": 1.0}})], SamplingParams(), repeats=1)  # one prompt: clipped
    evaluate_tasks(ctx, [Task("a", {"rewards": {"apple": 1.0}})] * 2, SamplingParams(), repeats=1)  # two: "apple"
    apple = len(tokenizer("apple", add_special_tokens=False)["input_ids"]) + 1
    kiwi = len(tokenizer("kiwi kiwi kiwi", add_special_tokens=False)["input_ids"])
    totals = ctx.generation_totals()
    seconds = totals.pop("time_generate_eval_s")
    assert seconds > 0
    assert totals == {"completions_eval": 3.0, "completion_tokens_eval": float(kiwi + 2 * apple),
                      "completions_clipped_eval": 1.0, "completion_len_max_eval": float(max(kiwi, apple))}


def test_completion_stats_by_hand():
    totals = {"completions_base": 4.0, "completion_tokens_base": 10.0, "completions_clipped_base": 1.0,
              "completion_len_max_base": 4.0, "time_generate_base_s": 2.0,
              "completions_retry": 0.0, "completion_tokens_retry": 0.0, "completions_clipped_retry": 0.0,
              "completion_len_max_retry": 0.0, "time_generate_retry_s": 0.0}
    assert completion_stats(totals) == {"completion_len_mean_base": 2.5, "completion_len_max_base": 4.0,
                                        "completion_clipped_frac_base": 0.25,
                                        "tokens_per_s_base": 5.0, "samples_per_s_base": 2.0}  # no retries: no rates
