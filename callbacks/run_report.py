"""``RunReportCallback``: at the end of every fit, the run's key figures and ``curves.png`` next to its CSV."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from r3l_lightning.callbacks.evaluation import EvalCallback
from r3l_lightning.console import say
from r3l_lightning.report import report


class RunReportCallback(L.Callback):
    """When ``fit`` ends, prints ``r3l report``'s key figures and writes ``<csv log_dir>/curves.png`` (rank 0;
    nothing of the two without a ``CSVLogger``), then ``EvalCallback``'s ``[eval gain]`` line, which the
    ``EvalCallback`` leaves to it: the gain and its standard error are printed once, as the run's last line.

    The text is printed at ``teardown``, after Lightning's progress bar has drawn its last state (``r3l fit``
    places this callback behind the bar; listed in a config of a plain ``Trainer``, put it last). A fit that
    raised prints nothing.
    """

    def __init__(self) -> None:
        self._text: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, EvalCallback):
                callback.print_gain = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = []
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is not None:
            logger.save()  # the final evaluation may still sit in the logger's buffer
            text, png = report(logger.log_dir)
            lines += [text, f"curves: {png}"]
        lines += [cb.gain_line for cb in trainer.callbacks if isinstance(cb, EvalCallback) and cb.gain_line]
        self._text = "\n".join(lines) if lines else None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._text is not None:
            say(trainer, self._text)
        self._text = None
