"""Sample tables in the Trainer's own loggers: a few rollout groups per rollout file, one row per attempt.

TensorBoard gets a markdown table (``add_text``, the TEXT tab), W&B a ``wandb.Table`` (``WandbLogger.log_table``),
under one tag per split — ``rollouts/train`` and ``rollouts/eval`` — logged at the trainer's global step, so
that the epochs are the steps of one tag's slider. For the CSV logger the table is the rollout log itself
(``<log_dir>/rollouts/*.jsonl``). Other loggers get nothing. Only the loggers' own APIs are used.

A row holds what is needed to judge the attempt: the task's content (its payload, e.g. the numbers and the target),
every turn of the base and retry responses with the observation that followed each, the reflection's verdict and
every other field of its report, the pivot, the rewards and the training samples with their advantages.
"""

from __future__ import annotations

import json
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

COLUMNS = ["epoch", "task_id", "task", "attempt", "base_reward", "base_turns", "base_response", "reflection",
           "report", "pivot", "retry_reward", "retry_response", "samples"]
CELL_CHARS = 300  # one response turn, observation, report field or task payload shows this head; the log has all


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per attempt (base trajectory) of every record, in :data:`COLUMNS` order."""
    rows = []
    for record in records:
        for i, attempt in enumerate(record["attempts"]):
            base, retry, reflection = attempt["base"], attempt.get("retry"), attempt.get("reflection")
            rows.append([
                record.get("epoch"),
                record["task_id"],
                describe_task(record.get("task"), base),
                i,
                base["reward"],
                base.get("turns"),
                all_turns(base),
                reflection_verdict(reflection),
                report_fields(reflection),
                attempt.get("pivot"),
                retry["reward"] if retry else None,
                all_turns(retry) if retry else "",
                "; ".join(f"{s['kind']} A={s['advantage']:+.2f} ({s['trainable_tokens']} tok)" for s in attempt["samples"]),
            ])
    return rows


def clip(text: str, chars: int = CELL_CHARS) -> str:
    return text if len(text) <= chars else text[:chars] + "…"


def describe_task(payload: Any, trajectory: dict[str, Any]) -> str:
    """The task's payload as ``key=value`` pairs (``numbers=[3, 4, 11] target=23``); without one, the first
    observation (the task as the agent saw it)."""
    if isinstance(payload, dict) and payload:
        return clip(" ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)}"
                             for k, v in payload.items()))
    if payload not in (None, "", {}):
        return clip(str(payload))
    observations = trajectory.get("observations") or [""]
    return clip(observations[0])


def reflection_verdict(reflection: dict[str, Any] | None) -> str:
    """The report's ``trajectory_outcome``, ``invalid (<reason>)``, or "" when there was no reflection."""
    if reflection is None:
        return ""
    if reflection.get("report") is None:
        return f"invalid ({reflection.get('invalid_reason') or 'unknown'})"
    return str(reflection["report"].get("trajectory_outcome", ""))


def report_fields(reflection: dict[str, Any] | None) -> str:
    """Every field of the report but its verdict, one ``field: value`` line each; for an invalid reflection, the
    head of what was written."""
    if reflection is None:
        return ""
    report = reflection.get("report")
    if report is None:
        return clip(reflection.get("text") or "")
    return "\n".join(f"{key}: {clip(value if isinstance(value, str) else json.dumps(value, default=str))}"
                     for key, value in report.items() if key != "trajectory_outcome")


def all_turns(trajectory: dict[str, Any]) -> str:
    """Every assistant turn, ``turn k: <response>``, each followed by the observation it got (``→ …``) when the
    episode went on; guidance messages (a retry's) are marked."""
    observations = trajectory.get("observations") or []
    lines = []
    turn = 0
    for message in trajectory["messages"]:
        if message.get("guidance"):
            lines.append(f"guidance: {clip(message['content'])}")
        elif message["role"] == "assistant":
            turn += 1
            lines.append(f"turn {turn}: {clip(message['content'])}")
            if turn < len(observations):
                lines.append(f"→ {clip(observations[turn])}")
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; pipes escaped, line breaks shown as ↵ (a cell is one line)."""

    def cell(value: Any) -> str:
        text = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ↵ ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_tables(loggers: list[Logger], key: str, records: list[dict[str, Any]], step: int) -> None:
    """Log ``records`` as a table under ``key`` (``rollouts/train``, ``rollouts/eval``) at ``step`` to every logger
    that has a table API."""
    if not records:
        return
    rows = table_rows(records)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(COLUMNS, rows), global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=COLUMNS, data=rows, step=step)
