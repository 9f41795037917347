"""Callbacks that drive exploration, evaluation, export and the end-of-fit report (installed as
``r3l_lightning.callbacks``)."""

from r3l_lightning.callbacks.budget import RolloutTokenBudget
from r3l_lightning.callbacks.evaluation import EvalCallback
from r3l_lightning.callbacks.exploration import ExplorationCallback
from r3l_lightning.callbacks.export import HFExportCallback
from r3l_lightning.callbacks.preemption import SigtermCheckpoint
from r3l_lightning.callbacks.run_report import RunReportCallback

__all__ = [
    "EvalCallback", "ExplorationCallback", "HFExportCallback", "RolloutTokenBudget", "RunReportCallback",
    "SigtermCheckpoint",
]
