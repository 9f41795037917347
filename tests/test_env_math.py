"""Math tasks: loaders for jsonl / json / parquet with field options, math-verify checking, attempts."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from r3l_lightning.envs.base import Task
from r3l_lightning.envs import math as math_env
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
    path.write_text(json.dumps([{"q": "1+1?", "a": "2"}, {"q": "1-1?", "a": 0}]))
    tasks = MathTasks(str(path), question_field="q", answer_field="a")
    assert [t.payload for t in tasks.tasks] == [{"question": "1+1?", "answer": "2"},
                                                {"question": "1-1?", "answer": "0"}]
    assert tasks[1].task_id == "rows-1"


def test_missing_files_and_hf_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MathTasks(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "x",\n "answer": }]')
    with pytest.raises(ValueError, match=r"bad.json:2: malformed JSON"):
        MathTasks(str(bad))
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            MathTasks("some-org/some-dataset")


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
     ("3", "}}{{\\frac", False), ("x^2", "x^{2}", True), ("4.5", "\\boxed{\\frac{9}{2}}", True),
     ("2", "no idea", False), ("\\frac{1}{2}", "0.6", False)],
)
def test_math_verify_equivalence(reference, answer, expected):
    assert answers_match(reference, answer) is expected


def test_math_verify_works_off_the_main_thread_and_times_out_on_it(monkeypatch):
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("\\frac{1}{2}", "0.5")))
    worker.start()
    worker.join()
    assert results == [True]
    monkeypatch.setattr(math_env, "VERIFY_TIMEOUT_S", 1)
    start = time.monotonic()
    assert answers_match("3", "9^{9^{9}}") is False  # sympy would run for minutes without the timeout
    assert time.monotonic() - start < 5


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


def test_invalid_format_and_replay_restore():
    task = Task("m", {"question": "Half of 9?", "answer": "4.5"})
    strict = MathEnv().make_episode(task)
    strict.reset()
    result = strict.step("It is 4.5")
    assert (result.reward, result.done, result.info) == (0.0, True, {"attempt": 1, "outcome": "invalid_format"})
    lenient = MathEnv(end_on_invalid_format=False).make_episode(task)
    observations = [lenient.reset()]
    actions = ["It is 4.5", "<answer>4</answer>"]
    observations += [lenient.step(a).observation for a in actions]
    assert lenient.step("<answer>9/2</answer>").reward == 1.0
    fresh = MathEnv(end_on_invalid_format=False).make_episode(task)
    assert fresh.restore(actions, observations) and fresh.attempt == 2
