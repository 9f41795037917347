"""Reflection: the messages the policy diagnoses its own trajectory with, the JSON schema its report is
decoded under, the report's parser, and the guidance a retry receives (the prompt texts live in
:mod:`r3l_lightning.prompts`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from r3l_lightning.envs.base import GroundedField
from r3l_lightning.prompts import (GROUNDED_FIELDS_HEADER, GUIDANCE_TEMPLATE, REFLECTION_REQUEST,
                                  REFLECTION_SYSTEM_PROMPT, fill)
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


def report_schema(num_turns: int, reward: float, max_reward: float = 1.0, max_chars: int = 200,
                  grounded: Sequence[GroundedField] = ()) -> dict:
    """JSON schema of a report that :func:`parse_reflection` accepts for this trajectory.

    It encodes the report's rules so that a constrained decoder can only write a valid report:

    - every field present, in the spec's order, and no other field;
    - ``retry_from_step`` is one of 0 … K−1 (K = ``num_turns``), null iff the outcome is ``success``;
    - ``improvement_suggestion`` is a non-empty string, null iff the outcome is ``success``;
    - the outcome is limited by the reward: below ``max_reward`` it is ``failure`` (a trajectory that did not
      reach the task's maximum reward cannot be called a success, efficient or not); at ``max_reward`` it is
      ``success`` or ``success_but_inefficient`` (the latter asks for a retry, like a failure);
    - free-text fields hold 1 to ``max_chars`` characters, so that the report fits the token budget;
    - ``grounded`` fields (``reflection_schema: grounded``) follow ``retry_from_step``, each under its own schema
      at the chosen pivot (one branch per pivot when a field's schema depends on the step, e.g. the admissible
      actions at that step), and are null in a ``success`` report.
    """
    if num_turns < 1:
        raise ValueError(f"a report needs a trajectory with at least one step, got num_turns={num_turns}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    text = {"type": "string", "minLength": 1, "maxLength": max_chars}
    null = {"type": "null"}
    names = list(FIELDS) + [g.name for g in grounded]

    def report(outcome: str, root_cause: dict, suggestion: dict, step: dict, extra: dict) -> dict:
        return {
            "type": "object",
            "properties": {
                "trajectory_summary": text,
                "root_cause_analysis": root_cause,
                # equivalent mutant: "type" misspelt here or in retry_from_step's schema below (the enum decides)
                "trajectory_outcome": {"type": "string", "enum": [outcome]},
                "improvement_suggestion": suggestion,
                "retry_from_step": step,
                **extra,
            },
            "required": names,
            "additionalProperties": False,
        }

    def retrying(outcome: str) -> list[dict]:
        per_step = any(len(g.schemas) > 1 for g in grounded)
        pivots = [[k] for k in range(num_turns)] if per_step else [list(range(num_turns))]
        return [report(outcome, text, text, {"type": "integer", "enum": ks},
                       {g.name: g.schema_at(ks[0]) for g in grounded}) for ks in pivots]

    if reward < max_reward:
        branches = retrying("failure")
        return branches[0] if len(branches) == 1 else {"anyOf": branches}
    return {"anyOf": [
        report("success", {"anyOf": [text, null]}, null, null, {g.name: null for g in grounded}),
        *retrying("success_but_inefficient"),
    ]}


@dataclass
class Reflection:
    """A validated reflection report."""

    report: dict
    outcome: Outcome
    retry_from_step: int | None
    grounded: dict[str, str] = field(default_factory=dict)  # environment-grounded fields (see GroundedField)

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
    trajectory: Trajectory, task_instructions: str, system_prompt: str = REFLECTION_SYSTEM_PROMPT,
    grounded: Sequence[GroundedField] = (),
) -> list[Message]:
    """Chat messages that ask the policy to reflect on ``trajectory`` (``system_prompt``: see ``prompts``); the
    ``grounded`` fields' descriptions follow the feedback, one line each, outside any JSON."""
    hint = trajectory.info.get("reflection_hint") or ""
    parts = [
        f"# Task instructions given to the agent\n{task_instructions}",
        f"# The agent's trajectory ({trajectory.num_turns} steps, numbered from 0)\n{render_trajectory(trajectory)}",
        f"# Environment feedback\n{trajectory.feedback}\nFinal reward: {trajectory.reward:g}",
    ]
    if hint:
        parts.append(f"# Additional information\n{hint}")
    if grounded:
        parts.append("\n".join([GROUNDED_FIELDS_HEADER] + [f"- {g.name}: {g.description}" for g in grounded]))
    parts.append(REFLECTION_REQUEST)
    return [Message("system", system_prompt), Message("user", "\n\n".join(parts))]


def parse_reflection(text: str, num_turns: int,
                     grounded: Sequence[GroundedField] = ()) -> tuple[Reflection | None, str]:
    """Parse and validate a reflection; returns (reflection, "") or (None, reason it is invalid).

    ``grounded`` fields must be present too; in a report that asks for a retry each must be a string that its
    schema at the pivot admits (its ``enum``, its ``pattern``), and in a ``success`` report null."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:  # equivalent mutant: end < start ({ and } are never at the same index)
        return None, "no_json"
    # strict=False: a raw control character inside a string (constrained decoders allow it) is kept; equivalent
    # mutant: strict=None (falsy, as False)
    try:
        report = json.loads(text[start : end + 1], strict=False)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the decoder's limit
        return None, "invalid_json"
    if not isinstance(report, dict):  # equivalent mutants of its reason: unreached, as JSON from { to } is an object
        return None, "invalid_json"
    missing = [f for f in FIELDS if f not in report] + [g.name for g in grounded if g.name not in report]
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
    values = {}
    for g in grounded:
        value, schema = report[g.name], g.schema_at(step)
        if not isinstance(value, str) or not value.strip():
            return None, "missing_grounded_value"
        if ("enum" in schema and value not in schema["enum"]) or (
                "pattern" in schema and not re.search(schema["pattern"], value)):
            return None, "grounded_value_not_admissible"
        values[g.name] = value
    return Reflection(report, outcome, step, values), ""


def guidance_text(reflection: Reflection, template: str = GUIDANCE_TEMPLATE,
                  grounded: Sequence[GroundedField] = ()) -> str:
    """The guidance inserted into a retry: ``template`` with ``{report}`` replaced by the JSON report and
    ``{<field>}`` by that field of it (``{improvement_suggestion}``, a grounded field's name), then one line per
    grounded field the template does not name (the field's ``guidance``, e.g. ``Try the equation 6 * 8.``)."""
    fields = {name: "" if value is None else str(value) for name, value in reflection.report.items()}
    # equivalent mutant: ensure_ascii=None (falsy, as False)
    text = fill(template, report=json.dumps(reflection.report, indent=2, ensure_ascii=False), **fields)
    lines = [fill(g.guidance, value=reflection.grounded[g.name], step=str(reflection.retry_from_step))
             for g in grounded if g.name in reflection.grounded and "{" + g.name + "}" not in template]
    return "\n".join([text, *lines])


# Words that carry no instruction on their own: a suggestion with fewer than two other words ("error",
# "try again", "be more careful", "fails to match the target", "no improvement") tells a retry nothing.
_EMPTY_WORDS = frozenset(
    "a an the it its this that these be is are was were to of in on for at by with and or not no yes more "
    "careful carefully better again retry try trying error errors none null n/a na fix fixed correct correctly "
    "answer answers mistake mistakes wrong check double do does make sure fail fails failed failing failure "
    "improve improvement solve solved solving task target match matches puzzle next time agent attempt".split()
)
MIN_SUGGESTION_WORDS = 2  # words outside _EMPTY_WORDS an actionable suggestion has at least
COPY_WORDS = 6  # a field sharing this many consecutive words with the prompt copies it
EXAMPLE_COPY_WORDS = 3  # ... or this many with an example report the prompt shows (its subject is not the task's)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['/][a-z0-9]+)*", text.lower())


def _shingles(words: list[str], n: int = COPY_WORDS) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def example_reports(text: str) -> list[dict]:
    """The JSON objects written out in ``text`` (one per line, as the default reflection prompt shows its
    example report)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        # equivalent mutant: `or` (a line that parses as a JSON object both starts with { and ends with })
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                found.append(value)
    return found


def informativeness(reflection: Reflection, prompt_texts: Sequence[str],
                    failed_actions: Sequence[str] = ()) -> str:
    """Why a valid report says nothing a retry can act on, or ``""`` when it is informative.

    - ``copies_prompt``: a free-text field shares :data:`COPY_WORDS` consecutive words with one of
      ``prompt_texts`` (what the reflector was shown: its instructions and field descriptions, the task, the
      trajectory): the model copied its input instead of diagnosing the attempt;
    - ``copies_example``: a free-text field shares :data:`EXAMPLE_COPY_WORDS` consecutive words with an example
      report shown in ``prompt_texts`` (:func:`example_reports`): the 135M policy rewrites the example with other
      numbers ("It used 160 m per kilometre; a kilometre is 1600 m" on a Countdown task);
    - ``trivial_suggestion``: a report that asks for a retry and whose suggestion has fewer than
      :data:`MIN_SUGGESTION_WORDS` words outside :data:`_EMPTY_WORDS` (``"error"``, ``"try again"``, ``"1"``);
    - ``repeats_failed_action``: a grounded field (:attr:`Reflection.grounded`) proposes one of the
      ``failed_actions`` (the base's own failed answers or actions, markup tags such as ``<answer>`` dropped)
      again.
    """
    # equivalent mutant: `if prompt_texts or True` (the union of no sets is the empty set)
    prompt = set().union(*(_shingles(_words(t)) for t in prompt_texts)) if prompt_texts else set()
    example = {shingle for t in prompt_texts for report in example_reports(t) for v in report.values()
               if isinstance(v, str) for shingle in _shingles(_words(v), EXAMPLE_COPY_WORDS)}
    fields = [v for v in (reflection.report.get(name) for name in
                          ("trajectory_summary", "root_cause_analysis", "improvement_suggestion")) if isinstance(v, str)]
    if any(_shingles(_words(v)) & prompt for v in fields):
        return "copies_prompt"
    if any(_shingles(_words(v), EXAMPLE_COPY_WORDS) & example for v in fields):
        return "copies_example"
    if reflection.wants_retry:
        # equivalent mutant: "XXXX" for "" (one word, below MIN_SUGGESTION_WORDS as well)
        suggestion = reflection.report.get("improvement_suggestion") or ""
        if sum(w not in _EMPTY_WORDS for w in _words(suggestion)) < MIN_SUGGESTION_WORDS:
            return "trivial_suggestion"
    failed = {" ".join(re.sub(r"<[^>]*>", " ", a).split()) for a in failed_actions}  # tags (<answer>) dropped
    if any(" ".join(str(v).split()) in failed for v in reflection.grounded.values()):
        return "repeats_failed_action"
    return ""
