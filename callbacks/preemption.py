"""``SigtermCheckpoint``: on SIGTERM (preemption, ``scancel``, ``kill``), save a checkpoint before exiting."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SigtermCheckpoint(L.Callback):
    """Writes ``last.ckpt`` (in the ``ModelCheckpoint`` directory, or ``dirpath``) when Lightning stops on SIGTERM.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the next optimizer step or epoch end (a
    running rollout phase finishes first); this callback saves there, atomically like every Lightning
    checkpoint. ``--ckpt_path last`` resumes: exactly from an epoch boundary; from inside an epoch,
    at the next step, with the rest of that epoch's experience explored anew.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        directory = self.dirpath or next(
            (c.dirpath for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None
        ) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(directory) / "last.ckpt"
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: checkpoint saved to {path} at step {trainer.global_step}")
