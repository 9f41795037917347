"""The informative-reflection rule: a report that parses can still say nothing (copied instructions, an empty
suggestion, a grounded field that repeats the failure)."""

from __future__ import annotations

import pytest

from r3l_lightning.explore.reflection import Reflection, informativeness
from r3l_lightning.prompts import REFLECTION_SYSTEM_PROMPT

TASK_RULES = ("You solve Countdown puzzles: combine the given numbers with + - * / and parentheses so the equation "
              "equals the target, using every number exactly once.")


def report(summary="The agent wrote 3 + 5 = 8 for target 15.", cause="It added where it had to multiply.",
           suggestion="Multiply the two numbers: 3 * 5 = 15.", outcome="failure", step=0, **grounded) -> Reflection:
    fields = {"trajectory_summary": summary, "root_cause_analysis": cause, "trajectory_outcome": outcome,
              "improvement_suggestion": suggestion, "retry_from_step": step, **grounded}
    return Reflection(fields, outcome, step, dict(grounded))


PROMPTS = [REFLECTION_SYSTEM_PROMPT, TASK_RULES]


def test_a_diagnosis_of_the_attempt_is_informative():
    assert informativeness(report(), PROMPTS) == ""


def test_copying_the_field_descriptions_or_the_example_of_the_prompt_is_not_informative():
    # the 135M policy's reports: the prompt's own text, word for word
    copied = report(summary="What the agent did at each step and what came of it.")
    assert informativeness(copied, PROMPTS) == "copies_prompt"
    assert informativeness(report(suggestion="Multiply by 1000: 3 km is 3000 m."), PROMPTS) == "copies_prompt"
    # six consecutive words of the prompt are enough, whatever the case and punctuation around them
    assert informativeness(report(cause="WHY it went wrong, traced back!"), PROMPTS) == "copies_prompt"
    # five are not: a diagnosis may use a few of the prompt's words
    assert informativeness(report(cause="why it went wrong: adding"), PROMPTS) == ""
    # ... not even the five a prompt text ends with ("... using every number exactly once.")
    assert informativeness(report(cause="Not using every number exactly once."), PROMPTS) == ""


def test_restating_the_task_rules_is_copying_too():
    restated = report(suggestion="Combine the given numbers with + - * / and parentheses so the equation equals the target.")
    assert informativeness(restated, PROMPTS) == "copies_prompt"


@pytest.mark.parametrize("suggestion", ["error", "Try again.", "be more careful", "Check the answer!", "N/A", "  ", "1",
                                        "fails to match target", "no improvement", "Clarify the error"])
def test_a_suggestion_with_nothing_to_act_on_is_trivial(suggestion):
    assert informativeness(report(suggestion=suggestion), PROMPTS) == "trivial_suggestion"


@pytest.mark.parametrize("suggestion", ["Use multiplication", "subtract the smaller number", "Write 3 * 5."])
def test_a_short_suggestion_that_names_an_action_is_informative(suggestion):
    assert informativeness(report(suggestion=suggestion), PROMPTS) == ""


def test_a_success_report_needs_no_suggestion():
    success = Reflection({"trajectory_summary": "Answered 3 + 5 = 8, the target.", "root_cause_analysis": None,
                          "trajectory_outcome": "success", "improvement_suggestion": None,
                          "retry_from_step": None}, "success", None)
    assert informativeness(success, PROMPTS) == ""


def test_a_grounded_field_that_repeats_a_failed_answer_is_not_informative():
    failed = ["<answer>3 + 5</answer>", "3 + 5", "5 + 3"]
    assert informativeness(report(equation_to_try="3  + 5"), PROMPTS, failed) == "repeats_failed_action"
    assert informativeness(report(equation_to_try="3 * 5"), PROMPTS, failed) == ""
    # the failed answer as the base wrote it, tags and all, is the same answer
    assert informativeness(report(equation_to_try="3 + 5"), PROMPTS, ["<answer>3 + 5</answer>"]) == (
        "repeats_failed_action")


def test_example_reports_are_the_json_object_lines_of_a_text():
    from r3l_lightning.explore.reflection import example_reports

    text = 'Fields:\n{not json}\n  {"trajectory_summary": "s", "retry_from_step": 0}  \n[{"a": 1}]\n{"b": 2} and more'
    assert example_reports(text) == [{"trajectory_summary": "s", "retry_from_step": 0}]


def test_the_default_prompt_shows_no_placeholder_value_only_a_filled_in_report():
    # every JSON object the prompt shows is a complete, valid report (nothing like "<the strategy used>" to copy),
    # and the field descriptions stand outside it, one line per field
    import json
    import re

    from r3l_lightning.explore.reflection import FIELDS, parse_reflection

    objects = re.findall(r"^\{.*\}$", REFLECTION_SYSTEM_PROMPT, flags=re.M)
    assert len(objects) == 1
    reflection, reason = parse_reflection(objects[0], num_turns=1)
    assert reason == "" and reflection.outcome == "failure" and reflection.retry_from_step == 0
    assert set(json.loads(objects[0])) == set(FIELDS)
    assert all(re.search(rf"^- {name}: ", REFLECTION_SYSTEM_PROMPT, flags=re.M) for name in FIELDS)


def test_grounded_fields_are_described_to_the_reflector_outside_the_json():
    from r3l_lightning.envs.countdown import CountdownEnv
    from r3l_lightning.envs.base import Task
    from r3l_lightning.explore.reflection import reflection_messages
    from r3l_lightning.prompts import GROUNDED_FIELDS_HEADER
    from r3l_lightning.trajectory import Message, Trajectory

    env = CountdownEnv()
    task = Task("countdown-t", {"numbers": [2, 7], "target": 14})
    base = Trajectory([Message("system", env.system_prompt()), Message("user", "Numbers [2, 7], target 14."),
                       Message("assistant", "<answer>2 + 7</answer>")], observations=["Numbers [2, 7], target 14."])
    fields = env.grounded_fields(task, base)
    plain = reflection_messages(base, env.system_prompt())[1].content
    grounded = reflection_messages(base, env.system_prompt(), grounded=fields)[1].content
    assert GROUNDED_FIELDS_HEADER not in plain
    line = f"- equation_to_try: {fields[0].description}"
    assert f"{GROUNDED_FIELDS_HEADER}\n{line}" in grounded and grounded.endswith("Write the JSON diagnosis now.")


def test_rewriting_the_prompts_example_report_with_other_numbers_is_not_informative():
    # what the 135M policy wrote on Countdown under the prompt with a worked example (seed 2 of the comparison)
    assert informativeness(report(cause="It used 160 m per kilometre; a kilometre is 1600 m."), PROMPTS) == "copies_example"
    assert informativeness(report(summary="Step 1 answered 480 m, the checker rejected it."), PROMPTS) == "copies_example"
    # two words in a row are not enough, and a prompt without an example report flags nothing of the kind
    assert informativeness(report(cause="It used addition; 2 + 7 misses 14."), PROMPTS) == ""
    no_example = [REFLECTION_SYSTEM_PROMPT.split("For the format only")[0], TASK_RULES]
    assert informativeness(report(cause="It used 160 m per kilometre; a kilometre is 1600 m."), no_example) == ""
