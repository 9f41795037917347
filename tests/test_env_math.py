"""Math tasks: loaders for jsonl / json / parquet with field options, math-verify checking, attempts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r3l_lightning.envs.base import Task
from r3l_lightning.envs.math import MathEnv, MathTasks, answers_match, last_boxed

FIXTURES = Path(__file__).parent / "fixtures"


def test_gsm8k_jsonl_answers_after_hashes_without_commas():
    tasks = MathTasks(str(FIXTURES / "gsm8k_tiny.jsonl"), answer_format="gsm8k")
    assert len(tasks) == 4
    assert [tasks[i].payload["answer"] for i in range(4)] == ["7", "1234", "4.5", "144"]
    assert tasks[0].task_id == "gsm8k_tiny-0" and tasks[0].payload["question"].startswith("Tom has")
    assert len(MathTasks(str(FIXTURES / "gsm8k_tiny.jsonl"), answer_format="gsm8k", limit=2)) == 2


def test_parquet_with_other_field_names_and_boxed_answers():
    tasks = MathTasks(str(FIXTURES / "math500_tiny.parquet"), question_field="problem",
                      answer_field="solution", answer_format="boxed")
    assert [tasks[i].payload["answer"] for i in range(3)] == ["\\frac{1}{2}", "3", "4"]


def test_json_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"q": "1+1?", "a": "2"}]))
    assert MathTasks(str(path), question_field="q", answer_field="a")[0].payload == {"question": "1+1?", "answer": "2"}


def test_malformed_rows_name_file_line_and_field(tmp_path):
    with pytest.raises(ValueError, match=r"malformed.jsonl:2: missing or empty field 'answer'.*answer_field"):
        MathTasks(str(FIXTURES / "malformed.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        MathTasks(str(bad))
    with pytest.raises(ValueError, match="no final answer"):
        MathTasks(str(FIXTURES / "gsm8k_tiny.jsonl"), answer_format="boxed")


def test_boxed_extraction_handles_nested_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "reference, answer, expected",
    [("42", "42.0", True), ("\\frac{1}{2}", "0.5", True), ("1234", "1,234", True), ("3", "4", False),
     ("3", "}}{{\\frac", False), ("x^2", "x^{2}", True)],
)
def test_math_verify_equivalence(reference, answer, expected):
    assert answers_match(reference, answer) is expected


def test_attempts_feedback_and_reflection_hint():
    env = MathEnv(max_attempts=2)
    ep = env.make_episode(Task("m", {"question": "Half of 9?", "answer": "4.5"}))
    assert ep.reset() == "Half of 9?"
    first = ep.step("<think>9/2</think><answer>4</answer>")
    assert (first.reward, first.done) == (0.0, False) and "Incorrect" in first.observation
    second = ep.step("<answer>\\frac{9}{2}</answer>")
    assert (second.reward, second.done) == (1.0, True)
    assert ep.reflection_hint() == "The reference final answer is: 4.5"
    hidden = MathEnv(reveal_answer_to_reflection=False).make_episode(Task("m", {"question": "q", "answer": "1"}))
    assert hidden.reflection_hint() == ""
    ep.reset()
    ep.step("<answer>1</answer>")
    last = ep.step("<answer>2</answer>")
    assert (last.reward, last.done) == (0.0, True) and "Not solved after 2" in ep.feedback()
