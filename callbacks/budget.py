"""``RolloutTokenBudget``: stop training once exploration has generated a given number of tokens."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from r3l_lightning.callbacks.exploration import ExplorationCallback

GENERATED_TOKEN_KEYS = ("tokens_base", "tokens_reflection", "tokens_retry")


class RolloutTokenBudget(L.Callback):
    """Ends ``fit`` after the epoch in which the generated rollout tokens (base samples, reflections and retries,
    summed over ranks and epochs) reach ``max_tokens``: equal budgets for methods that spend their tokens
    differently (R³L spends some on reflections and short retries, GRPO all on samples from scratch).

    Logs ``budget/rollout_tokens`` (cumulative) every epoch. Needs an :class:`ExplorationCallback`.
    """

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.spent = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        exploration = next((c for c in trainer.callbacks if isinstance(c, ExplorationCallback)), None)
        if exploration is None:
            raise ValueError("RolloutTokenBudget needs an ExplorationCallback in trainer.callbacks")
        self.spent += int(sum(exploration.last_stats.get(k, 0.0) for k in GENERATED_TOKEN_KEYS))
        for logger in trainer.loggers:
            logger.log_metrics({"budget/rollout_tokens": float(self.spent)}, step=trainer.global_step)
        if self.spent >= self.max_tokens:
            rank_zero_info(f"rollout token budget reached: {self.spent} >= {self.max_tokens}")
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"spent": self.spent}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spent = state_dict["spent"]
