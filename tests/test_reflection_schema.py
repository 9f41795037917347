"""Schema-constrained reflections: the report schema accepts exactly the reports the parser accepts for a
trajectory, and constrained decoding makes even a random model write valid reports (HF engine; the vLLM
engine is checked in tests/vllm_engine_checks.py)."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.engines.hf import HFEngine
from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.reflection import parse_reflection, reflection_messages, report_schema
from r3l_lightning.prompts import REFLECTION_REQUEST
from r3l_lightning.trajectory import Message, Trajectory
from scripted import GuessEnv, GuessTasks, ScriptedEngine


def report(outcome="failure", step=1, suggestion="change the guess", root="kept guessing pear", summary="guessed pear"):
    return json.dumps({"trajectory_summary": summary, "root_cause_analysis": root, "trajectory_outcome": outcome,
                       "improvement_suggestion": suggestion, "retry_from_step": step})


def accepts(schema: dict, text: str) -> bool:
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    return _is_grammar_accept_string(grammar, text)


# (num_turns, reward, report text) -> accepted; each row is also checked against the parser below
CASES = [
    (3, 0.0, report(step=0), True),
    (3, 0.0, report(step=2), True),
    (3, 0.0, report(step=3), False),  # pivot K is out of [0, K-1]
    (3, 0.0, report(step=-1), False),
    (3, 0.0, report(outcome="success", step=None, suggestion=None), False),  # reward 0 < 1: not a success
    (3, 0.0, report(outcome="success_but_inefficient"), False),  # nor an inefficient success
    (3, 0.0, report(suggestion=None), False),  # a failure needs a suggestion
    (3, 0.0, report(suggestion=""), False),  # ... that is not empty
    (3, 0.0, report(step=None), False),  # ... and a pivot
    (2, 1.0, report(outcome="success", step=None, suggestion=None, root=None), True),
    (2, 1.0, report(outcome="success", step=None, suggestion=None), True),  # root cause may be text
    (2, 1.0, report(outcome="success", step=None, suggestion=None, root=5), False),  # ... or null, nothing else
    (2, 1.0, report(outcome="success", step=1, suggestion=None), False),  # success carries no pivot
    (2, 1.0, report(outcome="success_but_inefficient", step=1), True),
    (2, 1.0, report(outcome="failure"), False),  # the trajectory solved the task
    (2, 0.5, report(step=1), True),  # a partial reward below the maximum is a failure
]


@pytest.mark.parametrize("turns, reward, text, valid", CASES)
def test_schema_accepts_exactly_what_the_parser_accepts(turns, reward, text, valid):
    assert accepts(report_schema(turns, reward), text) == valid
    parsed, _ = parse_reflection(text, turns)
    if valid:  # every report the schema lets through parses as a valid reflection
        assert parsed is not None


SUCCESS = json.loads(report(outcome="success", step=None, suggestion=None, root=None))


@pytest.mark.parametrize("text, reason", [
    ("no report here", "no_json"),
    ('} {', "no_json"),  # no brace pair in order
    ("{trajectory_summary: guessed}", "invalid_json"),
    ('{"trajectory_summary": "a"} and {"retry_from_step": 0}', "invalid_json"),  # first { to last }: not one object
    (json.dumps({**SUCCESS, "retry_from_step": 1}), "success_with_retry"),
    (json.dumps({**SUCCESS, "improvement_suggestion": "guess again"}), "success_with_retry"),
    (report(step=True), "pivot_not_integer"),
    (report(step=2), "pivot_out_of_range"),  # 2 turns: pivots 0 and 1
    (report(step=-1), "pivot_out_of_range"),
    (report(suggestion="  "), "missing_suggestion"),
])
def test_a_rejected_report_gets_its_reason(text, reason):
    assert parse_reflection(text, 2) == (None, reason)


def test_a_report_is_found_in_text_around_it_and_may_hold_braces_and_raw_newlines():
    fields = json.loads(report(summary="guessed {pear}", step=1))
    text = "Here it is: " + json.dumps(fields).replace("guessed {pear}", "guessed\n{pear}") + "Done."
    reflection, reason = parse_reflection(text, 2)
    assert reason == "" and reflection.report == {**fields, "trajectory_summary": "guessed\n{pear}"}
    success, reason = parse_reflection(json.dumps(SUCCESS), 2)
    assert reason == "" and success.report == SUCCESS and success.retry_from_step is None


def test_schema_field_order_extra_fields_and_length_cap():
    schema = report_schema(3, 0.0, max_chars=10)
    short = {"root": "why? x", "suggestion": "try y"}
    assert accepts(schema, report(summary="x" * 10, **short))
    assert not accepts(schema, report(summary="x" * 11, **short))  # maxLength
    reordered = json.dumps({"trajectory_outcome": "failure", "trajectory_summary": "a", "root_cause_analysis": "b",
                            "improvement_suggestion": "c", "retry_from_step": 1})
    assert not accepts(schema, reordered)  # the spec's field order: reasoning before the verdict
    extra = report()[:-1] + ', "confidence": 1}'
    assert not accepts(schema, extra)
    assert schema == report_schema(3, 0.2, max_chars=10)  # every reward below the maximum gets the failure schema
    assert report_schema(3, 0.0) == report_schema(3, 0.0, max_chars=200)  # the default cap
    assert accepts(schema, report(summary="x", root="y", suggestion="z"))  # one character is enough


def test_the_schema_says_what_it_requires_to_any_validator():
    # xgrammar treats a schema strictly by default; other backends (and jsonschema) read only what it says
    import jsonschema

    validator = jsonschema.Draft202012Validator(report_schema(3, 0.0))
    assert validator.is_valid(json.loads(report()))
    assert not validator.is_valid("guessed pear")  # an object, not any JSON value
    assert not validator.is_valid({**json.loads(report()), "confidence": 1})  # no other field
    assert report_schema(3, 0.9, max_reward=0.9)["anyOf"]  # an environment whose maximum is 0.9


def test_schema_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_turns"):
        report_schema(0, 0.0)
    with pytest.raises(ValueError, match="max_chars"):
        report_schema(2, 0.0, max_chars=0)


def test_hf_engine_makes_a_random_model_write_valid_reports(tiny_policy, tiny_tokenizer, tiny_eos):
    """The random tiny model never writes JSON on its own; under the schema every report parses."""
    engine = HFEngine()
    engine.bind(tiny_policy, tiny_tokenizer, tiny_eos)
    prompts = [tiny_tokenizer("Write the JSON diagnosis now.")["input_ids"]] * 2
    constraints = [Constraint(json_schema=report_schema(3, 0.0, max_chars=4)), None]  # ~45 tokens of JSON + 3 short strings
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=96, n=2, seed=0), constraints)
    assert [len(c) for c in out] == [2, 2]
    for c in out[0]:
        text = tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True)
        reflection, reason = parse_reflection(text, 3)
        assert reflection is not None, (reason, text)
        assert c.finish_reason == "stop" and reflection.outcome == "failure"
        assert all(lp <= 0.0 for lp in c.logprobs)
    free = [tiny_tokenizer.decode(c.token_ids) for c in out[1]]
    assert not any(parse_reflection(t, 3)[0] for t in free)  # the unconstrained prompt stays free


def test_explorer_asks_the_engine_for_one_schema_per_reflection(tiny_chat):
    reflection = report(step=1)
    engine = ScriptedEngine(lambda p: reflection if "Write the JSON diagnosis" in p else "pear",
                            tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    tasks = GuessTasks(2)
    R3LExplorer(group_size=4, reflection_max_new_tokens=300).explore(
        [tasks[0], tasks[1]], RolloutContext(GuessEnv(max_turns=3), engine, tiny_chat))
    reflect_call = next(c for c in engine.constraints if c is not None)
    # 2 tasks x 2 base trajectories of 3 failed turns: the failure schema with pivots 0..2, 300 - 64 chars
    assert reflect_call == [Constraint(json_schema=report_schema(3, 0.0, 1.0, 236))] * 4
    assert sum(c is not None for c in engine.constraints) == 1  # rollouts and retries are not constrained here

    free = ScriptedEngine(lambda p: reflection if "Write the JSON diagnosis" in p else "pear",
                          tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    R3LExplorer(group_size=4, reflection_decoding="free").explore([tasks[0]], RolloutContext(GuessEnv(), free, tiny_chat))
    assert all(c is None for c in free.constraints)
    with pytest.raises(ValueError, match="reflection_decoding"):
        R3LExplorer(reflection_decoding="grammar")


# ----- grounded fields (reflection_schema: grounded) -----------------------------------------------------------
from r3l_lightning.envs.base import GroundedField  # noqa: E402
from r3l_lightning.explore.reflection import guidance_text  # noqa: E402

# the corrected action at the pivot, one of the admissible actions at that step (ALFWorld / ScienceWorld style)
ACTION = GroundedField("corrected_action", "the action to take at the pivot step instead",
                       ({"type": "string", "enum": ["go north", "take key"]},
                        {"type": "string", "enum": ["open door", "go south"]}),
                       "At step {step}, take this action: {value}")
EQUATION = GroundedField("equation_to_try", "an equation to answer next",
                         ({"type": "string", "pattern": r"^\(*(5|3)\)*( [-+*/] \(*(5|3)\)*){1}$"},),
                         "Answer with this equation: {value}")


def grounded_report(step, action, outcome="failure", suggestion="open the door first"):
    fields = json.loads(report(outcome=outcome, step=step, suggestion=suggestion))
    fields["corrected_action"] = action
    return json.dumps(fields)


@pytest.mark.parametrize("step, action, valid", [
    (0, "go north", True), (0, "take key", True), (1, "open door", True),
    (0, "open door", False),  # admissible at step 1, not at the chosen pivot 0
    (1, "take key", False), (1, "dance", False),
])
def test_a_grounded_action_is_constrained_to_the_admissible_actions_at_the_chosen_pivot(step, action, valid):
    schema = report_schema(2, 0.0, grounded=[ACTION])
    text = grounded_report(step, action)
    assert accepts(schema, text) == valid
    reflection, reason = parse_reflection(text, 2, grounded=[ACTION])  # the parser applies the same rule
    assert (reflection is not None) == valid
    if valid:
        assert reflection.grounded == {"corrected_action": action} and reflection.retry_from_step == step
    else:
        assert reason == "grounded_value_not_admissible"


def test_a_grounded_field_is_required_and_null_in_a_success_report():
    without = report(step=0)  # the paper's fields only
    assert not accepts(report_schema(2, 0.0, grounded=[ACTION]), without)
    assert parse_reflection(without, 2, grounded=[ACTION]) == (None, "missing_field")
    success = json.loads(report(outcome="success", step=None, suggestion=None))
    assert not accepts(report_schema(2, 1.0, grounded=[ACTION]), json.dumps(success))
    success["corrected_action"] = None
    assert accepts(report_schema(2, 1.0, grounded=[ACTION]), json.dumps(success))
    assert parse_reflection(json.dumps(success), 2, grounded=[ACTION])[0].grounded == {}


@pytest.mark.parametrize("value", [5, None, "", "  "])
def test_a_grounded_value_must_be_a_non_blank_string(value):
    fields = json.loads(grounded_report(0, "go north"))
    fields["corrected_action"] = value
    assert parse_reflection(json.dumps(fields), 2, grounded=[ACTION]) == (None, "missing_grounded_value")


def test_a_step_independent_grounded_field_keeps_one_branch_and_checks_its_pattern():
    schema = report_schema(2, 0.0, grounded=[EQUATION])
    assert "anyOf" not in schema and list(schema["properties"])[-2:] == ["retry_from_step", "equation_to_try"]
    fields = json.loads(report(step=1))
    for equation, valid in (("5 * 3", True), ("(5 - 3)", True), ("5 * 4", False), ("5 * 3 * 3", False)):
        fields["equation_to_try"] = equation
        assert accepts(schema, json.dumps(fields)) == valid, equation
        assert (parse_reflection(json.dumps(fields), 2, grounded=[EQUATION])[0] is not None) == valid, equation


def test_the_retry_guidance_ends_with_each_grounded_value():
    reflection, _ = parse_reflection(grounded_report(1, "open door"), 2, grounded=[ACTION])
    text = guidance_text(reflection, "Review: {report}", grounded=[ACTION])
    assert text.startswith("Review: {") and text.endswith("\nAt step 1, take this action: open door")
    assert guidance_text(reflection, "Review: {report}") == text.split("\n" + "At step")[0]  # paper: the report only


def test_a_guidance_template_can_name_report_fields_instead_of_the_whole_report():
    reflection, _ = parse_reflection(grounded_report(1, "open door", suggestion="Open the door first."), 2,
                                     grounded=[ACTION])
    assert guidance_text(reflection, "{improvement_suggestion}", grounded=[ACTION]) == (
        "Open the door first.\nAt step 1, take this action: open door")
    # a template that names the grounded field itself gets no extra line
    assert guidance_text(reflection, "Do {corrected_action} at step {retry_from_step}.", grounded=[ACTION]) == (
        "Do open door at step 1.")


def test_the_guidance_shows_the_report_as_indented_json_and_a_missing_field_as_nothing():
    from r3l_lightning.explore.reflection import Reflection

    # the parser lets a failure report's root cause be null; non-ASCII text is shown as written
    fields = {"trajectory_summary": "Guessed pear.", "root_cause_analysis": None, "trajectory_outcome": "failure",
              "improvement_suggestion": "Guess a fruit – not pear.", "retry_from_step": 1}
    reflection = Reflection(fields, "failure", 1)
    assert guidance_text(reflection, "Review:\n{report}\nCause: {root_cause_analysis}.") == (
        'Review:\n{\n  "trajectory_summary": "Guessed pear.",\n  "root_cause_analysis": null,\n'
        '  "trajectory_outcome": "failure",\n  "improvement_suggestion": "Guess a fruit – not pear.",\n'
        '  "retry_from_step": 1\n}\nCause: .')


def test_the_reflection_prompt_numbers_the_steps_and_shows_feedback_reward_and_hint():
    trajectory = Trajectory([Message("system", "play"), Message("user", "o0"), Message("assistant", "a0"),
                             Message("user", "o1"), Message("assistant", "a1")], reward=0.5,
                            observations=["o0"], feedback="Final: wrong", info={"reflection_hint": "the word is apple"})
    system, user = reflection_messages(trajectory, "Guess a word.", system_prompt="Diagnose.")
    assert (system.role, system.content, user.role) == ("system", "Diagnose.", "user")
    # a step past the recorded observations shows an empty observation
    assert user.content == (
        "# Task instructions given to the agent\nGuess a word.\n\n"
        "# The agent's trajectory (2 steps, numbered from 0)\n"
        "## Step 0\nObservation:\no0\nResponse:\na0\n\n## Step 1\nObservation:\n\nResponse:\na1\n\n"
        "# Environment feedback\nFinal: wrong\nFinal reward: 0.5\n\n"
        "# Additional information\nthe word is apple\n\n" + REFLECTION_REQUEST)
    without_hint = reflection_messages(Trajectory(trajectory.messages, reward=1.0), "Guess a word.")[1].content
    assert "# Additional information" not in without_hint and "Final reward: 1\n" in without_hint
