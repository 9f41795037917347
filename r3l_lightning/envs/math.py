"""Math word problems (GSM8K / MATH-500 / OlympiadBench style), answers verified with math-verify.

Rows come from a ``.jsonl``/``.json``/``.parquet`` file or an HF ``datasets`` dataset (hub name or a
``save_to_disk`` directory), with configurable field names. The real sets cannot be downloaded on the
project's CI machines; the loaders are tested on small fixtures in ``tests/fixtures``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

from math_verify import parse, verify

from r3l_lightning.envs.answer_format import FORMAT_INSTRUCTIONS, AttemptEpisode, extract_answer
from r3l_lightning.envs.base import Environment, Episode, GroundedField, Task, TaskSource
from r3l_lightning.trajectory import Trajectory

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
_FILE_TYPES = (".jsonl", ".json", ".parquet")
VERIFY_TIMEOUT_S = 5  # per parse/verify call, main thread only (math-verify's timeout uses signal.alarm)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def reference_answer(raw: str, answer_format: AnswerFormat) -> str | None:
    """The final answer from a dataset's answer field."""
    if answer_format == "gsm8k":
        _, sep, tail = raw.rpartition("####")
        return tail.strip().replace(",", "") if sep else None
    if answer_format == "boxed":
        return last_boxed(raw)
    return raw.strip()


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; location names the file and line/row for error messages."""
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: malformed JSON line ({err.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(_FILE_TYPES)})")


def _read_hf_dataset(name: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local file; loading it as an HF dataset needs `pip install datasets`"
        ) from None
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(name, split=split)
    return [(f"{name}[{split}] row {i}", row) for i, row in enumerate(ds)]


class MathTasks(TaskSource):
    """Math problems from a file or an HF dataset.

    Args:
        path: ``.jsonl``/``.json``/``.parquet`` file, ``save_to_disk`` directory, or HF hub dataset name.
        question_field, answer_field: column names of the problem and of its reference answer.
        answer_format: ``gsm8k`` (text after ``####``), ``boxed`` (last ``\\boxed{}``) or ``plain``.
        split: split of an HF dataset. limit: keep the first ``limit`` rows.
        solution_field: a column with a worked solution, kept for the ``reference`` reflector (optional).
    """

    def __init__(self, path: str, question_field: str = "question", answer_field: str = "answer",
                 answer_format: AnswerFormat = "plain", split: str = "train", limit: int | None = None,
                 solution_field: str | None = None) -> None:
        source = Path(path).expanduser()
        if source.suffix in _FILE_TYPES and not source.is_file():
            raise FileNotFoundError(f"no such data file: {source}")
        rows = _read_rows(source) if source.is_file() else _read_hf_dataset(path, split)
        self.tasks: list[Task] = []
        for location, row in rows[:limit]:
            for name in (question_field, answer_field):
                if not isinstance(row, dict) or row.get(name) is None or not str(row[name]).strip():
                    raise ValueError(
                        f"{location}: missing or empty field {name!r} (configured question_field="
                        f"{question_field!r}, answer_field={answer_field!r}; change them to this data's columns)"
                    )
            answer = reference_answer(str(row[answer_field]), answer_format)
            if not answer:
                raise ValueError(f"{location}: no final answer in {answer_field!r} for answer_format={answer_format!r}")
            task_id = f"{source.stem}-{len(self.tasks)}"
            payload = {"question": str(row[question_field]).strip(), "answer": answer}
            if solution_field is not None and str(row.get(solution_field) or "").strip():
                payload["solution"] = str(row[solution_field]).strip()  # for the reference reflector
            self.tasks.append(Task(task_id, payload))

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]


def answers_match(reference: str, answer: str) -> bool:
    """math-verify equivalence of two final answers; any failure inside it counts as a mismatch.

    Each answer is parsed both as given and wrapped in ``$…$``, so plain numbers and bare LaTeX both
    parse. math-verify's timeouts rely on ``signal.alarm``, which only works on the main thread, so
    they are used there and disabled elsewhere (a worker thread then has no guard against answers
    like ``9^{9^{9}}`` that take sympy very long).
    """
    timeout = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout) + parse(reference, parsing_timeout=timeout)
        pred = parse(f"${answer}$", parsing_timeout=timeout) + parse(answer, parsing_timeout=timeout)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - a verifier error is a wrong answer, never a crash
        return False


class MathEpisode(AttemptEpisode):
    def __init__(self, task: Task, max_attempts: int, end_on_invalid_format: bool, reveal: bool) -> None:
        super().__init__(task, max_attempts, end_on_invalid_format)
        self.reveal = reveal

    def question(self) -> str:
        return self.task.payload["question"]

    def check(self, answer: str) -> tuple[str, str]:
        if answers_match(self.task.payload["answer"], answer):
            return "correct", "Correct!"
        return "incorrect", f"Incorrect: {answer} is not the right answer."

    def reflection_hint(self) -> str:
        return f"The reference final answer is: {self.task.payload['answer']}" if self.reveal else ""


class MathEnv(Environment):
    """Up to ``max_attempts`` answers with "incorrect, try again" feedback; reward 1 if one is verified.

    ``reveal_answer_to_reflection`` gives the reflection the reference final answer (never a solution),
    since the environment itself gives no diagnostic.
    """

    def __init__(self, max_attempts: int = 3, end_on_invalid_format: bool = True,
                 reveal_answer_to_reflection: bool = True) -> None:
        self.max_turns = max_attempts
        self.end_on_invalid_format = end_on_invalid_format
        self.reveal = reveal_answer_to_reflection

    def system_prompt(self) -> str:
        return f"Solve the math problem. {FORMAT_INSTRUCTIONS} The answer must be the final number or expression only."

    def make_episode(self, task: Task) -> Episode:
        return MathEpisode(task, self.max_turns, self.end_on_invalid_format, self.reveal)

    def grounded_fields(self, task: Task, trajectory: Trajectory) -> list[GroundedField]:
        """``first_wrong_step`` (the first wrong step of the reasoning, quoted or described) and ``corrected_value``
        (what that step should have given)."""
        return [
            GroundedField("first_wrong_step", "the first step of the reasoning that is wrong",
                          ({"type": "string", "minLength": 1, "maxLength": 160},), "The first wrong step: {value}"),
            GroundedField("corrected_value", "the value that step should have given",
                          ({"type": "string", "minLength": 1, "maxLength": 60},), "It should give: {value}"),
        ]

    def reference_report(self, task: Task, trajectory: Trajectory) -> dict | None:
        """A report from the reference final answer (and the reference solution, where the data has one): the
        pivot is the first attempt, whose final answer is the first wrong step we can point at."""
        if trajectory.reward >= 1 or trajectory.num_turns == 0:
            return None
        reference = task.payload["answer"]
        answers = [extract_answer(a) or "(no answer)" for a in trajectory.actions]
        solution = task.payload.get("solution")
        suggestion = f"The correct final answer is {reference}."
        if solution:
            suggestion += f" A correct solution: {solution}"
        return {
            "trajectory_summary": f"The agent answered {', then '.join(answers)}; the task was not solved.",
            "root_cause_analysis": f"The first answer, {answers[0]}, is not the reference answer {reference}.",
            "trajectory_outcome": "failure",
            "improvement_suggestion": suggestion,
            "retry_from_step": 0,
            "first_wrong_step": f"the final answer {answers[0]}",
            "corrected_value": reference,
        }
