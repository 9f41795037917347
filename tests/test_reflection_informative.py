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


def test_copying_the_field_descriptions_of_the_prompt_is_not_informative():
    # the main job's reports before this rule: the schema's own placeholder text, word for word
    copied = report(summary="The strategy used, the outcome, and how well it was executed")
    assert informativeness(copied, PROMPTS) == "copies_prompt"
    # six consecutive words of the prompt are enough, whatever the case and punctuation around them
    assert informativeness(report(cause="A CHAIN of 'why?' down to the root cause."), PROMPTS) == "copies_prompt"
    # five are not: a diagnosis may use a few of the prompt's words
    assert informativeness(report(cause="a chain of why down here"), PROMPTS) == ""


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
