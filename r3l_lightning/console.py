"""The console: progress bars for rollout phases, lines printed above them, and quiet third-party logs.

- :class:`PhaseProgress`: the ``progress`` callback of a ``RolloutContext``. Every generate call reports
  its number of sequences and its phase (rollouts, reflections, retries, eval); phases run one after
  another, so one bar is shown at a time, with its rate, and disappears when its phase ends. While
  Lightning's ``RichProgressBar`` is on screen (it captures the terminal, a tqdm bar would not show)
  the bar is a task of that display, otherwise a tqdm bar.
- :func:`say`: a line for the user (epoch summaries, evaluation results) printed above the bars.
- :func:`quiet_third_party`: vLLM logs through ``assets/vllm_logging.json`` (its
  ``VLLM_LOGGING_CONFIG_PATH``): warnings and errors only, every repeat of a message below ERROR
  dropped, errors always shown (set ``VLLM_LOGGING_CONFIG_PATH`` to your own file, or to an empty
  value for vLLM's default logging). Lightning's notes about the ``dataloader_iter`` training step
  (the project's deliberate design, see ``data.py``), its ``LeafSpec`` deprecation (raised by its
  own code) and its LitLogger tip are dropped, and so are deprecation warnings raised by vLLM's code.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

PHASE_NAMES: dict[str, str] = {"base": "rollouts", "reflection": "reflections", "retry": "retries", "eval": "eval"}
VLLM_LOGGING_CONFIG = Path(__file__).parent / "assets" / "vllm_logging.json"
LIGHTNING_NOTES = (  # (message regex, logger or None for a Python warning)
    (r"You are using the `dataloader_iter` step flavor", None),
    (r"Found `dataloader_iter` argument in the `training_step`", None),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", None),
    (r"💡 Tip: For seamless cloud logging", "lightning.pytorch.utilities.rank_zero"),
)


class PhaseProgress:
    """One bar per phase (sequences generated, with their rate), labelled ``"<label> <phase>"``."""

    def __init__(self, label: str, enabled: bool = True, trainer: L.Trainer | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self._rich = _live_rich_progress(trainer)
        self._phase: str | None = None
        self._bar: tqdm | None = None
        self._task = None

    def __call__(self, sequences: int, phase: str = "base") -> None:
        if not self.enabled:
            return
        if phase != self._phase:
            self.close()
            self._phase = phase
            name = f"{self.label} {PHASE_NAMES.get(phase, phase)}".strip()
            if self._rich is not None:
                self._task = self._rich.add_task(f"{name} (seq)", total=float("inf"))
            else:
                # disable=None: no bar when the output is not a terminal (a log file gets the summary lines)
                self._bar = tqdm(desc=name, unit="seq", leave=False, dynamic_ncols=True, disable=None)
        if self._task is not None:
            self._rich.update(self._task, advance=sequences, refresh=True)
        else:
            self._bar.update(sequences)

    def close(self) -> None:
        if self._task is not None:
            self._rich.remove_task(self._task)
        if self._bar is not None:
            self._bar.close()
        self._bar, self._task, self._phase = None, None, None

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _live_rich_progress(trainer: L.Trainer | None):
    """The ``rich`` Progress of Lightning's ``RichProgressBar`` while it is on screen, else None."""
    bar = getattr(trainer, "progress_bar_callback", None)
    progress = getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None
    return progress if progress is not None and progress.live.is_started else None


def say(trainer: L.Trainer | None, text: str) -> None:
    """Print ``text`` on rank 0: above Lightning's rich progress display while it is live (a plain
    log line would tear it), else through Lightning's info log."""
    progress = _live_rich_progress(trainer)
    if progress is None:
        rank_zero_info(text)
    elif trainer.is_global_zero:
        progress.console.print(text, markup=False, highlight=False, soft_wrap=True)


class RepeatFilter(logging.Filter):
    """Lets the first record of every message (logger, level, template) through and drops its repeats —
    a template repeated with other arguments too (one line per parameter or per weight sync becomes one
    line); records at ERROR and above always pass."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelno, str(record.msg))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return re.search(self.pattern, record.getMessage()) is None


def quiet_third_party() -> None:
    """Set up the quiet console (see the module docstring); a user's own ``VLLM_LOGGING_CONFIG_PATH``
    is kept. Idempotent."""
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
    for pattern, logger in LIGHTNING_NOTES:
        if logger is None:
            warnings.filterwarnings("ignore", message=f".*{pattern}")
        elif not any(isinstance(f, _DropMessage) and f.pattern == pattern for f in logging.getLogger(logger).filters):
            logging.getLogger(logger).addFilter(_DropMessage(pattern))
