"""The rollout log: group records (see :mod:`r3l_lightning.explore.records`) saved as JSON lines.

``<log_dir>/rollouts/epoch_<k>.jsonl`` holds the groups explored in epoch k (from 0), written by
``ExplorationCallback``; ``eval_<k>.jsonl`` the evaluation rollouts after k trained epochs (0 = before
training), written by ``EvalCallback``. One JSON object per line, one line per group, each tagged with
``split`` (``train`` / ``eval``) and ``epoch``.

Multi-process runs: every rank sends its records (at most its share of ``max_groups``) to rank 0, which
alone writes, so one epoch is one file. Every file is written atomically (temp file, fsync, rename).
The first ``table_groups`` groups also go to the Trainer's loggers as a table, under one tag per split
(``rollouts/train``, ``rollouts/eval``) at the global step (:func:`r3l_lightning.logger_tables.log_tables`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from r3l_lightning.checkpoint_io import atomic_write
from r3l_lightning.logger_tables import log_tables

Split = Literal["train", "eval"]
FILE_PREFIX: dict[str, str] = {"train": "epoch", "eval": "eval"}


@dataclass(frozen=True)
class RolloutLog:
    """How much of the rollouts ``<log_dir>/rollouts/`` keeps (``data.rollout_log`` in the config).

    Args:
        every_n_epochs: write the explored groups every n-th epoch (epoch 0 always); 0 turns the whole
            log off (evaluation rollouts are written whenever evaluation runs).
        max_groups: groups per file, over all ranks (0: off).
        max_chars: longest string kept (messages, reflections); longer ones keep their head and a
            ``[… N chars cut]`` marker (0: no limit).
        table_groups: groups per file shown as a table in the loggers (TensorBoard text, W&B table).
    """

    every_n_epochs: int = 1
    max_groups: int = 64
    max_chars: int = 4000
    table_groups: int = 4

    def __post_init__(self) -> None:
        for name in ("every_n_epochs", "max_groups", "max_chars", "table_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.rollout_log.{name} must be an integer >= 0 (0 turns it off), got {value!r}")

    def enabled(self) -> bool:
        return self.every_n_epochs > 0 and self.max_groups > 0

    def due(self, split: Split, epoch: int) -> bool:
        """Training groups every ``every_n_epochs`` epochs; evaluation rollouts whenever evaluation runs."""
        return self.enabled() and (split == "eval" or epoch % self.every_n_epochs == 0)


DEFAULT_ROLLOUT_LOG = RolloutLog()  # frozen: safe to share as a default argument


def rollout_path(log_dir: str | Path, split: Split, epoch: int) -> Path:
    return Path(log_dir) / "rollouts" / f"{FILE_PREFIX[split]}_{epoch}.jsonl"


def clip_strings(value: Any, max_chars: int) -> Any:
    """``value`` with every string longer than ``max_chars`` cut to its head and a marker (0: as is)."""
    if isinstance(value, str):
        if max_chars and len(value) > max_chars:
            return f"{value[:max_chars]}[… {len(value) - max_chars} chars cut]"
        return value
    if isinstance(value, dict):
        return {k: clip_strings(v, max_chars) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clip_strings(v, max_chars) for v in value]
    return value


def gather_to_rank_zero(trainer: L.Trainer, records: list[dict], limit: int) -> list[dict]:
    """Rank 0 gets the first ``limit`` records over all ranks, each rank contributing its first
    ``ceil(limit / world_size)``; other ranks get ``[]``. A collective: every rank must call it."""
    if trainer.world_size == 1:
        return records[:limit]
    share = records[: math.ceil(limit / trainer.world_size)]
    gathered: list[list[dict]] | None = [[] for _ in range(trainer.world_size)] if trainer.is_global_zero else None
    torch.distributed.gather_object(share, gathered, dst=0)
    return [r for part in gathered for r in part][:limit] if gathered is not None else []


def save_rollouts(trainer: L.Trainer, config: RolloutLog, split: Split, epoch: int, records: list[dict]) -> Path | None:
    """Write ``records`` to the split's file for ``epoch`` (rank 0) and log a table of the first ones.

    Every rank must call it (log directory and records are collected from all ranks). Returns the
    path written (rank 0), or None when nothing was written.
    """
    if not config.due(split, epoch):
        return None
    log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast: every rank asks
    clipped = [
        dict(clip_strings(r, config.max_chars), split=split, epoch=epoch) for r in records[: config.max_groups]
    ]
    kept = gather_to_rank_zero(trainer, clipped, config.max_groups)
    if not trainer.is_global_zero or not kept:
        return None
    path = rollout_path(log_dir, split, epoch)
    with atomic_write(path, "w") as f:
        for record in kept:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    log_tables(trainer.loggers, f"rollouts/{split}", kept[: config.table_groups], trainer.global_step)
    return path
