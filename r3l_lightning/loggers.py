"""Lightning's CSV and TensorBoard loggers with ``save_dir`` optional in a config.

Lightning's loggers require ``save_dir``, so a config had to repeat its run directory for each of them. With these,
a config names it once, as ``trainer.default_root_dir``: ``r3l fit`` / ``r3l evaluate`` set every logger's
``save_dir`` that the config leaves out to it (:func:`r3l_lightning.cli.derive_run_dirs`).
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import loggers


def _given(save_dir: _PATH | None, logger: str) -> _PATH:
    if save_dir is None:
        raise ValueError(f"{logger}: save_dir is not set; pass save_dir=..., or let `r3l fit` set it to "
                         "trainer.default_root_dir")
    return save_dir


class CSVLogger(loggers.CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``save_dir`` the ``r3l`` CLI fills in from
    ``trainer.default_root_dir`` when a config leaves it out."""

    def __init__(self, save_dir: _PATH | None = None, **kwargs: Any) -> None:
        super().__init__(_given(save_dir, "CSVLogger"), **kwargs)


class TensorBoardLogger(loggers.TensorBoardLogger):
    """``lightning.pytorch.loggers.TensorBoardLogger`` whose ``save_dir`` the ``r3l`` CLI fills in from
    ``trainer.default_root_dir`` when a config leaves it out."""

    def __init__(self, save_dir: _PATH | None = None, **kwargs: Any) -> None:
        super().__init__(_given(save_dir, "TensorBoardLogger"), **kwargs)
