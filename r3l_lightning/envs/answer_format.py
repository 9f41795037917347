"""The ``<think>…</think><answer>…</answer>`` response format and the multi-attempt episode it drives."""

from __future__ import annotations

import re
from abc import abstractmethod

from r3l_lightning.envs.base import Episode, StepResult, Task

FORMAT_INSTRUCTIONS = (
    "Think step by step inside <think> </think>, then give only the final answer inside "
    "<answer> </answer>, for example: <think> reasoning </think><answer> final answer </answer>"
)
_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.DOTALL | re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>…</answer>``; None when there is none or it is empty."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    answer = found[-1].strip()
    return answer or None


class AttemptEpisode(Episode):
    """A question answered in up to ``max_attempts`` responses, with feedback after each wrong one.

    Subclasses give the question text and :meth:`check` an extracted answer. A response without an
    answer tag ends the episode with reward 0 when ``end_on_invalid_format`` (the spec's rule for
    unparseable responses), otherwise it costs an attempt.
    """

    def __init__(self, task: Task, max_attempts: int, end_on_invalid_format: bool) -> None:
        self.task = task
        self.max_attempts = max_attempts
        self.end_on_invalid_format = end_on_invalid_format
        self.attempt = 0
        self.history: list[tuple[str, str]] = []  # (outcome, message) per attempt
        self.solved = False

    @abstractmethod
    def question(self) -> str:
        """The first observation."""

    @abstractmethod
    def check(self, answer: str) -> tuple[str, str]:
        """(outcome, feedback message) for an extracted answer.

        Outcome ``"correct"`` ends the episode with reward 1; any other label (``"incorrect"``, ...)
        costs an attempt. The label is reported in ``info["outcome"]``.
        """

    def reset(self) -> str:
        self.attempt = 0
        self.history = []
        self.solved = False
        return self.question()

    def step(self, action: str) -> StepResult:
        self.attempt += 1
        answer = extract_answer(action)
        if answer is None:
            outcome, message = "invalid_format", "Invalid format: no non-empty <answer> </answer> block was found."
        else:
            outcome, message = self.check(answer)
        self.history.append((outcome, message))
        info = {"attempt": self.attempt, "outcome": outcome}
        if outcome == "correct":
            self.solved = True
            return StepResult("Correct!", 1.0, True, info)
        out_of_attempts = self.attempt >= self.max_attempts
        if (outcome == "invalid_format" and self.end_on_invalid_format) or out_of_attempts:
            return StepResult(message, 0.0, True, info)
        left = self.max_attempts - self.attempt
        return StepResult(f"{message} Try again ({left} attempt{'s' if left > 1 else ''} left).", 0.0, False, info)

    def feedback(self) -> str:
        if self.solved:
            return f"Solved correctly on attempt {self.attempt} of {self.max_attempts}."
        last = self.history[-1][1] if self.history else "no attempt was made"
        return f"Not solved after {self.attempt} attempt(s) of {self.max_attempts}. Last error: {last}"
