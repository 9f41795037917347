"""Exploration: the explorer contract (``base``), attempts (``attempt``), batched episodes, reflection, and one
explorer per method (``group``, ``dapo``, ``raft``, ``r3l``, ``reflect_grpo``, ``critique_grpo``). Every one of
them is importable from here; ``best_of_n`` (docs/extending.md's example) by its module path."""

from r3l_lightning.explore.attempt import Attempt, TaskGroup
from r3l_lightning.explore.base import ExplorationResult, Explorer
from r3l_lightning.explore.critique_grpo import CritiqueGRPOExplorer, CritiqueGRPOReferenceExplorer
from r3l_lightning.explore.dapo import DAPOExplorer
from r3l_lightning.explore.group import Candidate, GroupExplorer
from r3l_lightning.explore.r3l import R3LExplorer
from r3l_lightning.explore.raft import RAFTExplorer
from r3l_lightning.explore.reflect_grpo import ReflectGRPOExplorer

__all__ = ["Attempt", "Candidate", "CritiqueGRPOExplorer", "CritiqueGRPOReferenceExplorer", "DAPOExplorer",
           "ExplorationResult", "Explorer", "GroupExplorer", "R3LExplorer", "RAFTExplorer", "ReflectGRPOExplorer",
           "TaskGroup"]
