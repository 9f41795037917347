"""``ExplorationCallback``: at the start of every epoch, roll out the next tasks and fill the buffer."""

from __future__ import annotations

import time

import lightning as L
import torch
from tqdm.auto import tqdm

from r3l_lightning.data import ExperienceDataModule
from r3l_lightning.explore.episodes import RolloutContext


def rollout_context(datamodule: L.LightningDataModule, pl_module: L.LightningModule, progress=None) -> RolloutContext:
    """The environment (from the DataModule), the engine and chat format (from the module)."""
    if not isinstance(datamodule, ExperienceDataModule):
        raise TypeError("exploration and evaluation callbacks need an ExperienceDataModule as `data`")
    return RolloutContext(datamodule.environment, pl_module.rollout_engine, pl_module.chat, progress)


def reduce_max_fn(trainer: L.Trainer):
    """Elementwise max over ranks of a list of ints (None when single-process)."""
    if trainer.world_size == 1:
        return None

    def reduce_max(values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.long, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.tolist()

    return reduce_max


def reduce_stats(trainer: L.Trainer, stats: dict[str, float]) -> dict[str, float]:
    """Counts are summed over ranks, rates and means averaged (a key missing on a rank counts as 0)."""
    if trainer.world_size == 1:
        return stats
    gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, sorted(stats))
    keys = sorted(set().union(*gathered))
    stats = {k: stats.get(k, 0.0) for k in keys}
    tensor = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=trainer.strategy.root_device)
    total = trainer.strategy.reduce(tensor, reduce_op="sum")
    return {
        k: float(v) / (trainer.world_size if k.endswith(("_rate", "_mean", "mean_pivot", "_s")) else 1)
        for k, v in zip(keys, total.tolist())
    }


class ExplorationCallback(L.Callback):
    """At every epoch start, runs the DataModule's explorer on its next ``tasks_per_epoch`` tasks.

    Each rank explores its own shard of the tasks with the module's rollout engine, puts the groups
    and SFT samples into the DataModule's buffer, and agrees with the other ranks on the number of
    optimizer steps. Statistics are logged under ``explore/``.
    """

    def __init__(self, show_progress: bool = True) -> None:
        self.show_progress = show_progress
        self.last_stats: dict[str, float] = {}
        self._epoch_started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule: ExperienceDataModule = trainer.datamodule
        pl_module.rollout_engine.sync_weights()  # every rank reaches this point: safe for collectives
        tasks = datamodule.next_train_tasks(datamodule.tasks_per_epoch, trainer.global_rank, trainer.world_size)
        bar = tqdm(desc=f"rollouts (epoch {trainer.current_epoch})", unit="seq", leave=False,
                   disable=not (self.show_progress and trainer.is_global_zero))
        start = time.perf_counter()
        try:
            result = datamodule.explorer.explore(tasks, rollout_context(datamodule, pl_module, bar.update))
        finally:
            bar.close()
        datamodule.buffer.put(result.groups, result.sft)
        steps = datamodule.plan_epoch(trainer.world_size, reduce_max_fn(trainer))
        stats = dict(result.stats, time_explore_s=time.perf_counter() - start, optimizer_steps=float(steps))
        self.last_stats = reduce_stats(trainer, stats)
        for logger in trainer.loggers:
            logger.log_metrics({f"explore/{k}": v for k, v in self.last_stats.items()}, step=trainer.global_step)
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"time/train_s": time.perf_counter() - self._epoch_started}, step=trainer.global_step)
