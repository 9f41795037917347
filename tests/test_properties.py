"""Property-based tests (hypothesis) of what model output and sampled ids reach: the reflection parser and its
schema, the Countdown expression checker, the pivot mask and the tokenisation of trajectories, and the distill
sample R³L builds from a retry. Any input: never a crash; a rejection always carries its reason; a mask
trains sampled assistant tokens only, never the prefix a retry shares with its base."""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from r3l_lightning.envs.base import Task
from r3l_lightning.envs.countdown import (MAX_EXPRESSION_CHARS, MAX_MAGNITUDE, CountdownEnv, CountdownEpisode,
                                          InvalidEquation, evaluate_expression, solve)
from r3l_lightning.explore import R3LExplorer
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.reflection import FIELDS, OUTCOMES, parse_reflection, report_schema
from r3l_lightning.prompts import REFLECTION_REQUEST
from r3l_lightning.trajectory import Message, Trajectory, make_sample
from scripted import GuessEnv, GuessTasks, ScriptedEngine

# few examples each (the file runs in seconds); deadline off: the first call of a tokenizer is slow
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# every reason parse_reflection gives for a rejected report (its docstring and the explorer's counters)
REJECTION_REASONS = {"no_json", "invalid_json", "missing_field", "unknown_outcome", "success_with_retry",
                     "pivot_not_integer", "pivot_out_of_range", "missing_suggestion", "missing_grounded_value",
                     "grounded_value_not_admissible"}

# ----- reflection reports -----------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 5) | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3),
                           max_leaves=6)
# a report as a model writes one: each field missing, valid, or any JSON value
field_values = {
    "trajectory_summary": st.text(max_size=30) | json_values,
    "root_cause_analysis": st.none() | st.text(max_size=30) | json_values,
    "trajectory_outcome": st.sampled_from(OUTCOMES) | json_values,
    "improvement_suggestion": st.none() | st.text(max_size=30) | json_values,
    "retry_from_step": st.none() | st.integers(-2, 6) | st.booleans() | json_values,
}
reports = st.fixed_dictionaries({}, optional=field_values)


def check_parse(text: str, num_turns: int, grounded=()):
    reflection, reason = parse_reflection(text, num_turns, grounded)
    if reflection is None:
        assert reason in REJECTION_REASONS
        return None
    assert reason == "" and reflection.outcome in OUTCOMES
    if reflection.outcome == "success":  # a success asks for nothing
        assert reflection.retry_from_step is None and not reflection.wants_retry
    else:  # any other outcome retries from a turn the trajectory has, with a suggestion
        assert 0 <= reflection.retry_from_step < num_turns and reflection.wants_retry
        assert reflection.report["improvement_suggestion"].strip()
    return reflection


@FAST
@given(st.text(), st.integers(1, 6))
@example("{" + "[" * 100_000 + "]" * 100_000 + "}", 2)  # nested deeper than the JSON decoder's recursion limit
@example('{"trajectory_outcome": "failure"} trailing }', 1)
def test_any_text_is_parsed_or_rejected_with_a_reason(text, num_turns):
    check_parse(text, num_turns)


@FAST
@given(reports, st.integers(1, 6), st.text(max_size=8), st.text(max_size=8))
def test_any_report_is_parsed_or_rejected_with_a_reason(report, num_turns, before, after):
    reflection = check_parse(before + json.dumps(report) + after, num_turns)
    missing = [f for f in FIELDS if f not in report]
    if missing:
        assert reflection is None
    if reflection is not None:
        assert reflection.report == report


# free text that is empty or has a non-blank character (blank text: see the xfail test below)
free_text = st.text(max_size=45).filter(lambda t: t.strip() or not t)
# reports with every field, of roughly the right types: a good share of them valid under some schema
plausible_reports = st.fixed_dictionaries({
    "trajectory_summary": free_text, "root_cause_analysis": st.none() | free_text,
    "trajectory_outcome": st.sampled_from(OUTCOMES), "improvement_suggestion": st.none() | free_text,
    "retry_from_step": st.none() | st.integers(-1, 5)})
VALID_FAILURE = {"trajectory_summary": "s", "root_cause_analysis": "r", "trajectory_outcome": "failure",
                 "improvement_suggestion": "multiply", "retry_from_step": 1}
VALID_SUCCESS = {"trajectory_summary": "s", "root_cause_analysis": None, "trajectory_outcome": "success",
                 "improvement_suggestion": None, "retry_from_step": None}


@FAST
@given(plausible_reports, st.integers(1, 5), st.sampled_from([0.0, 0.5, 1.0]), st.integers(1, 40))
@example(VALID_FAILURE, 2, 0.0, 40)
@example(VALID_SUCCESS, 1, 1.0, 40)
def test_a_report_the_schema_admits_is_one_the_parser_accepts(report, num_turns, reward, max_chars):
    # what a constrained decoder can write under report_schema is a valid report with the outcome the reward allows
    try:
        jsonschema.validate(report, report_schema(num_turns, reward, max_chars=max_chars))
    except jsonschema.ValidationError:
        return
    reflection = check_parse(json.dumps(report), num_turns)
    assert reflection is not None
    assert reflection.outcome == "failure" if reward < 1.0 else reflection.outcome != "failure"


@pytest.mark.xfail(strict=True, reason="known gap: the schema's minLength admits a blank suggestion, the parser "
                                       "rejects it (missing_suggestion); xgrammar ignores minLength/maxLength next "
                                       "to a pattern, so the fix needs a length-bounded regex")
def test_a_blank_suggestion_the_schema_admits_is_accepted():
    report = {**VALID_FAILURE, "improvement_suggestion": " "}
    jsonschema.validate(report, report_schema(2, 0.0))
    assert parse_reflection(json.dumps(report), 2)[0] is not None


@FAST
@given(st.lists(st.integers(1, 12), min_size=2, max_size=4), st.text(max_size=20)
       | st.from_regex(r"\A\(?(1[0-2]|[1-9])( [-+*/] \(?(1[0-2]|[1-9])\)?){1,3}\Z"))
def test_a_grounded_equation_is_admitted_only_when_its_pattern_matches(numbers, equation):
    task = Task("countdown-p", {"numbers": numbers, "target": 24})
    grounded = CountdownEnv().grounded_fields(task, Trajectory([]))
    report = {"trajectory_summary": "s", "root_cause_analysis": "r", "trajectory_outcome": "failure",
              "improvement_suggestion": "use *", "retry_from_step": 0, "equation_to_try": equation}
    reflection = check_parse(json.dumps(report), 1, grounded)
    admitted = bool(equation.strip()) and jsonschema.Draft202012Validator(grounded[0].schema_at(0)).is_valid(equation)
    assert (reflection is not None) == admitted
    if reflection is not None:
        assert reflection.grounded == {"equation_to_try": equation}


# ----- Countdown expressions --------------------------------------------------------------------------------

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


class TooLarge(Exception):
    pass


def exact(tree) -> Fraction:
    """The value of an expression tree (an int, or (left, operator, right)) in exact fractions."""
    if isinstance(tree, int):
        value = Fraction(tree)
    else:
        left, op, right = tree
        a, b = exact(left), exact(right)
        if op == "/" and b == 0:
            raise ZeroDivisionError
        value = OPERATIONS[op](a, b)
    if abs(value) > MAX_MAGNITUDE:
        raise TooLarge
    return value


def written(tree, spaced: bool) -> str:
    if isinstance(tree, int):
        return str(tree)
    left, op, right = tree
    gap = " " if spaced else ""
    return f"({written(left, spaced)}{gap}{op}{gap}{written(right, spaced)})"


def literals(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else literals(tree[0]) + literals(tree[2])


expression_trees = st.recursive(st.integers(0, 999),
                                lambda inner: st.tuples(inner, st.sampled_from(list(OPERATIONS)), inner),
                                max_leaves=6)


@FAST
@given(st.text(max_size=MAX_EXPRESSION_CHARS + 5))
@example("(" * 150 + "1" + ")" * 49)
@example("9" * 199)
@example("1" + " / (1 - 1)")
def test_any_text_evaluates_or_is_rejected_with_a_reason(text):
    try:
        value, numbers = evaluate_expression(text)
    except InvalidEquation as err:
        assert str(err)
        return
    assert isinstance(value, Fraction) and abs(value) <= MAX_MAGNITUDE
    assert all(type(n) is int and n >= 0 for n in numbers)


@FAST
@given(expression_trees, st.booleans(), st.sampled_from(["", " ", "\n"]))
def test_a_written_expression_evaluates_to_its_exact_value(tree, spaced, padding):
    text = padding + written(tree, spaced) + padding
    try:
        expected = exact(tree)
    except (ZeroDivisionError, TooLarge):
        with pytest.raises(InvalidEquation):
            evaluate_expression(text)
        return
    if len(text) > MAX_EXPRESSION_CHARS:
        with pytest.raises(InvalidEquation, match="longer than"):
            evaluate_expression(text)
        return
    assert evaluate_expression(text) == (expected, literals(tree))


@FAST
@given(st.lists(st.integers(1, 12), min_size=2, max_size=3), st.integers(1, 30),
       st.text(max_size=30) | expression_trees.map(lambda tree: written(tree, True)))
def test_an_answer_is_correct_exactly_when_it_uses_each_number_once_and_hits_the_target(numbers, target, answer):
    status, feedback = CountdownEpisode(Task("c", {"numbers": numbers, "target": target}), 1, True).check(answer)
    assert status in ("correct", "incorrect", "invalid_equation") and feedback
    try:
        value, used = evaluate_expression(answer)
    except InvalidEquation:
        assert status == "invalid_equation" and feedback.startswith("Invalid equation: ")
        return
    assert (status == "correct") == (Counter(used) == Counter(numbers) and value == target)


@FAST
@given(st.lists(st.integers(1, 12), min_size=2, max_size=3), st.integers(1, 40))
def test_a_solution_from_the_solver_is_checked_correct(numbers, target):
    equation = solve(numbers, target)
    if equation is not None:
        assert CountdownEpisode(Task("c", {"numbers": numbers, "target": target}), 1, True).check(equation) == (
            "correct", "Correct!")


# ----- tokenisation and the pivot mask ----------------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@st.composite
def conversations(draw, vocab: int = 49152, eos: int = 2):
    """A system prompt (or none), then up to 4 rounds of an observation and the ids a sampler returned for it."""
    messages = [Message("system", draw(texts))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages.append(Message("user", draw(texts)))
        ids = draw(st.lists(st.integers(3, vocab - 1), max_size=6)) + ([eos] if draw(st.booleans()) else [])
        messages.append(Message("assistant", "", token_ids=ids))
    return messages


@FAST
@given(conversations(), st.data())
def test_the_mask_trains_exactly_the_sampled_ids_from_the_pivot_on(tiny_chat, messages, data):
    sampled = [m.token_ids for m in messages if m.role == "assistant"]
    conversation = tiny_chat.tokenize(messages)
    assert [conversation.input_ids[s:e] for s, e in conversation.turn_spans] == sampled  # ids kept verbatim
    pivot = data.draw(st.integers(0, len(sampled)), label="pivot")
    sample = make_sample(conversation, 1.0, "base", pivot)
    assert len(sample.loss_mask) == len(sample.input_ids) and set(sample.loss_mask) <= {0.0, 1.0}
    trained = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
    # nothing of the template, the system prompt or an observation, and no turn before the pivot, is trained
    assert trained == [t for ids in sampled[pivot:] for t in ids]
    assert sample.num_assistant_tokens == sum(map(len, sampled))
    with pytest.raises(ValueError, match="first_trainable_turn must be in"):
        make_sample(conversation, 1.0, "base", data.draw(st.sampled_from([-1, len(sampled) + 1]), label="bad pivot"))


# ----- the distill sample -----------------------------------------------------------------------------------

GUIDED = "previous attempt at this task had issues"  # in the default guidance template
WORDS = ["pear", "plum", "fig", "apple"]  # "apple" wins the guessing game


def guess_policy(base: list[str], retry: list[str], pivot: int):
    """Reflection prompts get a failure report with ``pivot``, guided prompts the next of ``retry``, the others
    the next of ``base``."""
    answers = {"base": iter(base), "retry": iter(retry)}
    report = json.dumps({"trajectory_summary": "guessed", "root_cause_analysis": "wrong fruit",
                         "trajectory_outcome": "failure", "improvement_suggestion": "guess another fruit",
                         "retry_from_step": pivot})

    def respond(prompt: str) -> str:
        if REFLECTION_REQUEST in prompt:
            return report
        return next(answers["retry" if GUIDED in prompt else "base"])
    return respond


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(WORDS[:3]), min_size=1, max_size=3), st.lists(st.sampled_from(WORDS), min_size=3,
                                                                               max_size=3),
       st.data(), st.sampled_from(["paper", "after_observation", "authors"]), st.sampled_from(["pivot", "scratch"]))
def test_the_distill_sample_never_trains_the_prefix_it_shares_with_its_base(tiny_chat, base, retry, data, placement,
                                                                           retry_from):
    pivot = data.draw(st.integers(0, len(base) - 1), label="pivot")
    engine = ScriptedEngine(guess_policy(base, retry, pivot), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    explorer = R3LExplorer(group_size=2, guidance_placement=placement, retry_from=retry_from)
    result = explorer.explore([GuessTasks(1)[0]], RolloutContext(GuessEnv(max_turns=len(base)), engine, tiny_chat))
    samples = {s.kind: s for s in result.groups[0]}
    attempt = result.records[0]["attempts"][0]
    retried = [m["content"] for m in attempt["retry"]["messages"] if m["role"] == "assistant"]
    eos = tiny_chat.tokenizer.eos_token

    def text(sample, trained: bool) -> str:
        return tiny_chat.tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if bool(m) == trained],
                                          skip_special_tokens=False)

    # the base and the distill sample train their turns from the pivot on: the base's own, the retry's
    assert text(samples["base"], True) == "".join(w + eos for w in base[pivot:])
    assert text(samples["distill"], True) == "".join(w + eos for w in retried[pivot:])
    # the shared prefix is the base's messages before the turn the retry restarted from (the pivot, or 0 for a
    # retry from scratch); the distill sample starts with it, verbatim, and has no guidance
    restart = pivot if retry_from == "pivot" else 0
    assert attempt["pivot"] == restart
    context = tiny_chat.tokenizer.decode(samples["distill"].input_ids, skip_special_tokens=False)
    base_messages = [Message(m["role"], m["content"]) for m in attempt["base"]["messages"]]
    turns = [i for i, m in enumerate(base_messages) if m.role == "assistant"]
    assert context.startswith(tiny_chat.render(base_messages[: turns[restart]])) and GUIDED not in context
