"""``SigtermCheckpoint``: on a preemption signal (SIGTERM from SLURM, Kubernetes, ``scancel``, ``kill``; SIGUSR1 or
another one if configured), stop at the next safe point, save a checkpoint and exit with ``128 + signal``."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SigtermCheckpoint(L.Callback):
    """Stops a run within seconds of a preemption signal and writes ``last.ckpt`` (in the ``ModelCheckpoint``
    directory, or ``dirpath``) from which ``--ckpt_path last`` resumes exactly.

    The signal handler only sets a flag (Lightning's own ``trainer.received_sigterm`` for SIGTERM, this callback's
    for the other ``signals``); the run checks it at safe points: before every engine generate call and every
    environment step (exploration and evaluation, through :func:`raise_if_preempted`), before every micro-batch
    of a training step, and at Lightning's own step and epoch boundaries. There it raises Lightning's
    ``SIGTERMException``, this callback saves the checkpoint and sets the exit code to ``128 + signal number``
    (143 for SIGTERM, 138 for SIGUSR1), what schedulers expect of a process that stopped on their signal.

    What the checkpoint holds: an exploration cut short is undone (the task cursor and the explorer state are
    those before it) and redone on resume; a training step cut short between micro-batches is not applied and is
    trained on resume, with the epoch's other untrained steps (nothing is trained twice); an evaluation cut short
    is not redone after a mid-training evaluation (its epoch is complete), and redone before and after training.

    SLURM: with ``trainer.plugins: SLURMEnvironment(auto_requeue=True)`` Lightning itself handles its requeue
    signal (``--signal=USR1@90``: it saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``); the SIGTERM
    SLURM then sends stops the run here. Resume with ``--ckpt_path last`` (the newest of ``last.ckpt`` and the
    HPC checkpoint; ``last.ckpt`` is written last).

    Args:
        dirpath: where ``last.ckpt`` goes (default: the ``ModelCheckpoint`` directory, else
            ``<default_root_dir>/checkpoints``).
        signals: the signal names that stop the run (SIGTERM always does, through Lightning).
    """

    def __init__(self, dirpath: str | None = None, signals: list[str] | None = None) -> None:
        self.dirpath = dirpath
        names = ["SIGTERM"] if signals is None else signals
        unknown = [name for name in names if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"SigtermCheckpoint.signals: unknown signal name(s) {unknown}; use names such as "
                             "SIGTERM or SIGUSR1")
        self.signals = [signal.Signals[name] for name in names]
        self.received_signal: signal.Signals | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Install the flag-setting handlers (Lightning, registering its own SIGTERM handler later, calls ours
        too; under SLURM auto-requeue its requeue signal is left to Lightning)."""
        self.received_signal = None
        environment = trainer._accelerator_connector.cluster_environment
        lightning_owned = (environment.requeue_signal if isinstance(environment, SLURMEnvironment)
                           and environment.auto_requeue else None)
        for signum in self.signals:
            if signum != lightning_owned:
                self._previous_handlers[signum] = signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received_signal = signal.Signals(signum)
        previous = self._previous_handlers.get(self.received_signal)
        if callable(previous):
            previous(signum, frame)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        directory = self.dirpath or next(
            (c.dirpath for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None
        ) or Path(trainer.default_root_dir) / "checkpoints"
        path = Path(directory) / "last.ckpt"
        trainer.save_checkpoint(path)
        received = self.received_signal or signal.SIGTERM
        exception.code = 128 + received.value
        rank_zero_info(f"{received.name}: checkpoint saved to {path} at step {trainer.global_step}; "
                       f"exiting with code {exception.code} (resume with --ckpt_path last)")


def preemption_requested(trainer: L.Trainer) -> bool:
    """Whether a preemption signal arrived: SIGTERM (Lightning's flag) or a signal a ``SigtermCheckpoint`` listens
    to."""
    return trainer.received_sigterm or any(
        isinstance(c, SigtermCheckpoint) and c.received_signal is not None for c in trainer.callbacks)


def raise_if_preempted(trainer: L.Trainer | None) -> None:
    """Raise Lightning's ``SIGTERMException`` once a preemption signal arrived (no-op without a trainer): called at
    the run's safe stopping points, never from a signal handler."""
    if trainer is not None and preemption_requested(trainer):
        raise SIGTERMException()
