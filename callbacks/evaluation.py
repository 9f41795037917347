"""``EvalCallback``: benchmark the policy on held-out tasks before, during and after training."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.explore.base import is_success
from r3l_lightning.callbacks.exploration import rollout_context


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean of ``after[i] − before[i]`` over tasks and its standard error (unbiased std / √n; 0 for n < 2).

    Both lists hold one value per task (its mean over repeats), for the same tasks in the same order: the
    standard error of a paired difference, which is smaller than that of two independent rates.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain needs two equally long non-empty lists, got {len(before)} and {len(after)}")
    diffs = [a - b for a, b in zip(after, before)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n)


def _in_task_order(values: list[float], rank: int, world_size: int) -> list[float]:
    """Every rank's per-task values (rank r holds tasks r, r + W, …), gathered back into task order."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return list(values)
    shards: list[list[float]] = [[] for _ in range(world_size)]
    torch.distributed.all_gather_object(shards, list(values))
    total = sum(len(x) for x in shards)
    return [shards[i % world_size][i // world_size] for i in range(total)]


def evaluate_tasks(ctx: RolloutContext, tasks, params: SamplingParams, repeats: int) -> list[float]:
    """Rewards of ``repeats`` rollouts of every task (no reflection), all stepped together."""
    counters = RolloutCounters()
    states = [start_episode(ctx, task, counters, kind="eval") for task in tasks for _ in range(repeats)]
    run_episodes(ctx, states, params, counters, "tokens_eval")
    return [s.trajectory.reward for s in states]


def describe(label: str, result: dict[str, float]) -> str:
    return (
        f"[eval {label}] success_rate={result['eval/success_rate']:.3f} reward={result['eval/reward']:.3f} "
        f"({result['eval/rollouts']:.0f} rollouts, {result['eval/time_s']:.0f}s)"
    )


class EvalCallback(L.Callback):
    """Average reward and success rate (avg@``repeats``, temperature 0.4) on the DataModule's eval tasks.

    Runs before training, every ``every_n_epochs`` epochs, and after training. Each rank evaluates
    its shard of the tasks; torchmetrics syncs the means across ranks. Logged as ``eval/reward``,
    ``eval/success_rate``; every result is also kept in ``history``, and every task's success rate in
    ``task_success[label]``. After training, the gain over the evaluation before training is printed
    and logged (``eval/success_gain``, ``eval/success_gain_se``) with its paired standard error.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_tasks: int | None = None,
        repeats: int = 1,
        temperature: float = 0.4,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        before_training: bool = True,
        after_training: bool = True,
        seed: int = 1234,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.max_tasks = max_tasks
        self.repeats = repeats
        self.params = SamplingParams(temperature, top_p, max_new_tokens, 1, seed)
        self.before_training = before_training
        self.after_training = after_training
        self.history: list[dict[str, float]] = []
        self.task_success: dict[str, list[float]] = {}
        self.last_task_success: list[float] = []

    def run(self, datamodule, pl_module: L.LightningModule, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Evaluate this rank's shard of the eval tasks; means are synced across ranks."""
        start = time.perf_counter()
        pl_module.rollout_engine.sync_weights()  # every rank reaches this point: safe for collectives
        tasks = datamodule.eval_task_list(self.max_tasks)
        if not tasks:
            raise ValueError("evaluation needs data.eval_tasks: set it in the config")
        shard = tasks[rank::world_size]
        rewards = evaluate_tasks(rollout_context(datamodule, pl_module), shard, self.params, self.repeats)
        per_task = [sum(map(is_success, rewards[i * self.repeats : (i + 1) * self.repeats])) / self.repeats
                    for i in range(len(shard))]
        self.last_task_success = _in_task_order(per_task, rank, world_size)
        reward, success = MeanMetric().to(pl_module.device), MeanMetric().to(pl_module.device)
        for r in rewards:
            reward.update(torch.tensor(r, dtype=torch.float32))
            success.update(torch.tensor(float(is_success(r))))
        return {
            "eval/reward": float(reward.compute()),
            "eval/success_rate": float(success.compute()),
            "eval/rollouts": float(len(tasks) * self.repeats),
            "eval/time_s": time.perf_counter() - start,
        }

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str) -> dict[str, float]:
        result = self.run(trainer.datamodule, pl_module, trainer.global_rank, trainer.world_size)
        self.task_success[label] = self.last_task_success
        before = self.task_success.get("before training")
        gain_line = None
        if label == "after training" and before is not None:
            gain, se = paired_gain(before, self.last_task_success)
            result.update({"eval/success_gain": gain, "eval/success_gain_se": se})
            gain_line = (f"[eval gain] success_rate {sum(before) / len(before):.3f} -> "
                         f"{result['eval/success_rate']:.3f}: {gain:+.3f} ± {se:.3f} (paired standard error over "
                         f"{len(before)} tasks; gain/SE = {gain / se if se > 0 else float('nan'):.1f})")
        self.history.append({"label": label, "step": trainer.global_step, **result})
        for logger in trainer.loggers:
            logger.log_metrics(result, step=trainer.global_step)
        rank_zero_info(describe(label, result))
        if gain_line is not None:
            rank_zero_info(gain_line)
        return result

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_training:
            self.evaluate(trainer, pl_module, "before training")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        # the last epoch (max_epochs, or a callback such as RolloutTokenBudget stopping the run) is evaluated
        # once, by on_train_end
        last = trainer.should_stop or (trainer.max_epochs is not None and epoch >= trainer.max_epochs)
        if epoch % self.every_n_epochs == 0 and not (last and self.after_training):
            self.evaluate(trainer, pl_module, f"epoch {epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after_training:
            self.evaluate(trainer, pl_module, "after training")
