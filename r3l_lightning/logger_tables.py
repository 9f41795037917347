"""Sample tables in the Trainer's own loggers: a few rollout groups per epoch, one row per attempt.

TensorBoard gets a markdown table (``add_text``, the TEXT tab), W&B a ``wandb.Table`` (``WandbLogger.log_table``);
for the CSV logger the table is the rollout log itself (``<log_dir>/rollouts/*.jsonl``). Other loggers get
nothing. Only the loggers' own APIs are used.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

COLUMNS = ["epoch", "task_id", "attempt", "base_reward", "reflection", "pivot", "retry_reward", "samples",
           "base_response", "retry_response"]
RESPONSE_CHARS = 300  # a table cell shows the head of the last response; the rollout log has all of it


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per attempt (base trajectory) of every record, in :data:`COLUMNS` order."""
    rows = []
    for record in records:
        for i, attempt in enumerate(record["attempts"]):
            retry = attempt.get("retry")
            rows.append([
                record.get("epoch"),
                record["task_id"],
                i,
                attempt["base"]["reward"],
                describe_reflection(attempt.get("reflection")),
                attempt.get("pivot"),
                retry["reward"] if retry else None,
                "; ".join(f"{s['kind']} A={s['advantage']:+.2f} ({s['trainable_tokens']} tok)" for s in attempt["samples"]),
                last_response(attempt["base"]),
                last_response(retry) if retry else "",
            ])
    return rows


def describe_reflection(reflection: dict[str, Any] | None) -> str:
    """The report's outcome, ``invalid (<reason>)``, or "" when there was no reflection."""
    if reflection is None:
        return ""
    if reflection.get("report") is None:
        return f"invalid ({reflection.get('invalid_reason') or 'unknown'})"
    return str(reflection["report"].get("trajectory_outcome", ""))


def last_response(trajectory: dict[str, Any]) -> str:
    responses = [m["content"] for m in trajectory["messages"] if m["role"] == "assistant"]
    text = responses[-1] if responses else ""
    return text if len(text) <= RESPONSE_CHARS else text[:RESPONSE_CHARS] + "…"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; pipes escaped, line breaks shown as ↵ (a cell is one line)."""

    def cell(value: Any) -> str:
        text = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ↵ ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_tables(loggers: list[Logger], key: str, records: list[dict[str, Any]], step: int) -> None:
    """Log ``records`` as a table under ``key`` to every logger that has a table API."""
    if not records:
        return
    rows = table_rows(records)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(COLUMNS, rows), global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=COLUMNS, data=rows, step=step)
