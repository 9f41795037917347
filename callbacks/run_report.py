"""``RunReportCallback``: at the end of every fit, the run's key figures and ``curves.png`` next to its CSV."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from r3l_lightning.callbacks.evaluation import EvalCallback
from r3l_lightning.console import say
from r3l_lightning.report import report


class RunReportCallback(L.Callback):
    """Prints ``r3l report``'s key figures and writes ``<csv log_dir>/curves.png`` when ``fit`` ends
    (rank 0; nothing without a ``CSVLogger``), then repeats ``EvalCallback``'s ``[eval gain]`` line, so that the
    gain and its standard error are the run's last line. ``r3l fit`` adds it when the config does not list it."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None:
            return
        logger.save()  # the final evaluation may still sit in the logger's buffer
        text, png = report(logger.log_dir)
        gains = [cb.gain_line for cb in trainer.callbacks if isinstance(cb, EvalCallback) and cb.gain_line]
        say(trainer, "\n".join([text, f"curves: {png}", *gains]))
