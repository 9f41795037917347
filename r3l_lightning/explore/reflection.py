"""Reflection: the messages the policy diagnoses its own trajectory with, the JSON schema its report is
decoded under, the report's parser, and the guidance a retry receives (the prompt texts live in
:mod:`r3l_lightning.prompts`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from r3l_lightning.prompts import GUIDANCE_TEMPLATE, REFLECTION_REQUEST, REFLECTION_SYSTEM_PROMPT, fill
from r3l_lightning.trajectory import Message, Trajectory

Outcome = Literal["success", "success_but_inefficient", "failure"]
OUTCOMES: tuple[str, ...] = ("success", "success_but_inefficient", "failure")
FIELDS: tuple[str, ...] = (
    "trajectory_summary",
    "root_cause_analysis",
    "trajectory_outcome",
    "improvement_suggestion",
    "retry_from_step",
)


def report_schema(num_turns: int, reward: float, max_reward: float = 1.0, max_chars: int = 200) -> dict:
    """JSON schema of a report that :func:`parse_reflection` accepts for this trajectory.

    It encodes the report's rules so that a constrained decoder can only write a valid report:

    - every field present, in the spec's order, and no other field;
    - ``retry_from_step`` is one of 0 … K−1 (K = ``num_turns``), null iff the outcome is ``success``;
    - ``improvement_suggestion`` is a non-empty string, null iff the outcome is ``success``;
    - the outcome is limited by the reward: below ``max_reward`` it is ``failure`` (a trajectory that did not
      reach the task's maximum reward cannot be called a success, efficient or not); at ``max_reward`` it is
      ``success`` or ``success_but_inefficient`` (the latter asks for a retry, like a failure);
    - free-text fields hold 1 to ``max_chars`` characters, so that the report fits the token budget.
    """
    if num_turns < 1:
        raise ValueError(f"a report needs a trajectory with at least one step, got num_turns={num_turns}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = {"type": "string", "minLength": 1, "maxLength": max_chars}
    steps = {"type": "integer", "enum": list(range(num_turns))}

    def report(outcome: str, root_cause: dict, suggestion: dict, step: dict) -> dict:
        return {
            "type": "object",
            "properties": {
                "trajectory_summary": text,
                "root_cause_analysis": root_cause,
                "trajectory_outcome": {"type": "string", "enum": [outcome]},
                "improvement_suggestion": suggestion,
                "retry_from_step": step,
            },
            "required": list(FIELDS),
            "additionalProperties": False,
        }

    if reward < max_reward:
        return report("failure", text, text, steps)
    null = {"type": "null"}
    return {"anyOf": [
        report("success", {"anyOf": [text, null]}, null, null),
        report("success_but_inefficient", text, text, steps),
    ]}


@dataclass
class Reflection:
    """A validated reflection report."""

    report: dict
    outcome: Outcome
    retry_from_step: int | None

    @property
    def wants_retry(self) -> bool:
        return self.outcome != "success" and self.retry_from_step is not None


def render_trajectory(trajectory: Trajectory) -> str:
    """The trajectory as numbered steps of observation and response."""
    lines = []
    assistant = [m for m in trajectory.messages if m.role == "assistant"]
    for k, response in enumerate(assistant):
        observation = trajectory.observations[k] if k < len(trajectory.observations) else ""
        lines.append(f"## Step {k}\nObservation:\n{observation}\nResponse:\n{response.content}")
    return "\n\n".join(lines)


def reflection_messages(
    trajectory: Trajectory, task_instructions: str, system_prompt: str = REFLECTION_SYSTEM_PROMPT
) -> list[Message]:
    """Chat messages that ask the policy to reflect on ``trajectory`` (``system_prompt``: see ``prompts``)."""
    hint = trajectory.info.get("reflection_hint") or ""
    parts = [
        f"# Task instructions given to the agent\n{task_instructions}",
        f"# The agent's trajectory ({trajectory.num_turns} steps, numbered from 0)\n{render_trajectory(trajectory)}",
        f"# Environment feedback\n{trajectory.feedback}\nFinal reward: {trajectory.reward:g}",
    ]
    if hint:
        parts.append(f"# Additional information\n{hint}")
    parts.append(REFLECTION_REQUEST)
    return [Message("system", system_prompt), Message("user", "\n\n".join(parts))]


def parse_reflection(text: str, num_turns: int) -> tuple[Reflection | None, str]:
    """Parse and validate a reflection; returns (reflection, "") or (None, reason it is invalid)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None, "no_json"
    try:  # strict=False: a raw control character inside a string (constrained decoders allow it) is kept
        report = json.loads(text[start : end + 1], strict=False)
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(report, dict):
        return None, "invalid_json"
    missing = [f for f in FIELDS if f not in report]
    if missing:
        return None, "missing_field"
    outcome = report["trajectory_outcome"]
    if outcome not in OUTCOMES:
        return None, "unknown_outcome"
    step = report["retry_from_step"]
    suggestion = report["improvement_suggestion"]
    if outcome == "success":
        if step is not None or suggestion is not None:
            return None, "success_with_retry"
        return Reflection(report, outcome, None), ""
    if isinstance(step, bool) or not isinstance(step, int):
        return None, "pivot_not_integer"
    if not 0 <= step < num_turns:
        return None, "pivot_out_of_range"
    if not isinstance(suggestion, str) or not suggestion.strip():
        return None, "missing_suggestion"
    return Reflection(report, outcome, step), ""


def guidance_text(reflection: Reflection, template: str = GUIDANCE_TEMPLATE) -> str:
    """The guidance inserted into a retry: the JSON report in ``template`` (its ``{report}`` field)."""
    return fill(template, report=json.dumps(reflection.report, indent=2, ensure_ascii=False))
