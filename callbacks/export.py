"""``HFExportCallback``: write the trained policy in HF format (``save_pretrained``) for HF/vLLM."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class HFExportCallback(L.Callback):
    """Saves policy + tokenizer to ``dirpath`` (default ``<log_dir>/hf_model``) when training ends."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        target = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")
        if trainer.is_global_zero:
            pl_module.policy.save_pretrained(target)
            pl_module.tokenizer.save_pretrained(target)
            rank_zero_info(f"policy exported to {target}")
        trainer.strategy.barrier()
        return target

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
