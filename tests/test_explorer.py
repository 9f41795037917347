"""R³L explorer branches with a scripted engine: retry, distill, masks, SFT admission, failures."""

from __future__ import annotations

import json

import pytest

from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.explorers import GroupExplorer, R3LExplorer
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


def test_reflect_grpo_mode_retries_failures_from_scratch_and_trains_the_guided_retry(tiny_chat):
    result, engine = run(tiny_chat, json.dumps(REFLECTION), advantage="grpo", reflect_on="failures",
                         retry_from_scratch=True, distill=False, pivotal_credit=False, sft_rule="none")
    group = result.groups[0]
    assert [s.kind for s in group] == ["base", "retry", "base", "retry"]
    retry = group[1]
    text = _text(tiny_chat, retry)
    assert "previous attempt at this task had issues" in text.split("<|im_end|>")[0]  # in the system prompt
    assert _text(tiny_chat, retry, trainable_only=True) == "apple<|im_end|>"  # from scratch: one turn
    assert result.sft == []
    assert [s.advantage for s in group] == pytest.approx([-0.8660254, 0.8660254] * 2, abs=1e-5)


def test_only_failures_are_reflected_on_when_asked(tiny_chat):
    env = GuessEnv(max_turns=3)
    engine = ScriptedEngine(script(json.dumps(REFLECTION), base_answer="apple"), tiny_chat.tokenizer,
                            tiny_chat.tokenizer.eos_token_id)
    R3LExplorer(group_size=4, reflect_on="failures").explore([GuessTasks(1)[0]], RolloutContext(env, engine, tiny_chat))
    assert engine.calls == [2]  # both base episodes won at once: no reflection call


def test_group_options_drop_uniform_groups_scale_and_overlong_penalty(tiny_chat):
    env = GuessEnv(max_turns=1)
    engine = ScriptedEngine(lambda p: "pear", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    ctx = RolloutContext(env, engine, tiny_chat)
    dropped = GroupExplorer(group_size=3, drop_uniform_groups=True).explore([GuessTasks(1)[0]], ctx)
    assert dropped.groups == [] and dropped.stats["groups_dropped"] == 1
    # alternate answers: rewards [1, 0]; mean_baseline [.5, -.5] scaled by 1/(1 + τ) with τ = 1
    answers = iter(["apple", "pear"] * 2)
    engine.script = lambda p: next(answers)
    opmd = GroupExplorer(group_size=2, advantage="mean_baseline", advantage_scale=0.5).explore([GuessTasks(1)[0]], ctx)
    assert [s.advantage for s in opmd.groups[0]] == pytest.approx([0.25, -0.25])


def test_overlong_penalty_lowers_the_reward_of_truncated_trajectories(tiny_chat):
    from r3l_lightning.engines.base import Completion

    class Truncating(ScriptedEngine):
        def generate(self, prompts, params):
            out = super().generate(prompts, params)
            return [[Completion(c.token_ids[:-1], c.logprobs[:-1], "length") for c in o] if i == 0 else o
                    for i, o in enumerate(out)]

    engine = Truncating(lambda p: "apple", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = GroupExplorer(group_size=2, advantage="mean_baseline", overlong_penalty=0.5).explore(
        [GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat))
    # both win (R = 1) but the first was truncated: rewards [.5, 1] -> [-.25, .25]
    assert [s.advantage for s in result.groups[0]] == pytest.approx([-0.25, 0.25])
    assert result.stats["overlong_responses"] == 1


def test_raft_keeps_only_successes_as_sft(tiny_chat):
    from r3l_lightning.explore.explorers import RAFTExplorer

    answers = iter(["apple", "pear", "pear", "apple"])
    engine = ScriptedEngine(lambda p: next(answers), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    result = RAFTExplorer(group_size=4).explore([GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=1), engine, tiny_chat))
    assert result.groups == []
    assert [s.kind for s in result.sft] == ["sft_success", "sft_success"]
    assert all(_text(tiny_chat, s, trainable_only=True) == "apple<|im_end|>" for s in result.sft)
