"""``EvalCallback``: benchmark the policy on held-out tasks before, during and after training."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from torchmetrics import MeanMetric

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.episodes import (
    RolloutContext,
    RolloutCounters,
    completion_stats,
    run_episodes,
    start_episode,
)
from r3l_lightning.explore.base import is_success
from r3l_lightning.explore.records import trajectories_record
from r3l_lightning.callbacks.exploration import rollout_context, timed_sync
from r3l_lightning.console import PhaseProgress, say
from r3l_lightning.rollout_log import save_rollouts
from r3l_lightning.trajectory import Trajectory


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


def evaluate_tasks(ctx: RolloutContext, tasks: list[Task], params: SamplingParams, repeats: int) -> list[Trajectory]:
    """``repeats`` rollouts of every task (task-major, no reflection), all stepped together."""
    counters = RolloutCounters()
    states = [start_episode(ctx, task, counters) for task in tasks for _ in range(repeats)]
    run_episodes(ctx, states, params, counters, "tokens_eval")
    return [s.trajectory for s in states]


def describe(label: str, result: dict[str, float]) -> str:
    """The evaluation's console line, e.g. ``[eval before training] success_rate=0.281 reward=0.281 (128 rollouts,
    5s; engine start-up 34s)``."""
    times = [f"{result['eval/time_s']:.0f}s"]
    times += [f"{name} {result[key]:.0f}s" for key, name in (("eval/engine_start_s", "engine start-up"),
                                                           ("eval/weight_sync_s", "weight sync"))
              if result.get(key, 0.0) >= 0.5]  # a sync that costs nothing (the HF engine samples the policy) is left out
    return (
        f"[eval {label}] success_rate={result['eval/success_rate']:.3f} reward={result['eval/reward']:.3f} "
        f"({result['eval/rollouts']:.0f} rollouts, {'; '.join(times)})"
    )


class EvalCallback(L.Callback):
    """Average reward and success rate (avg@``repeats``, temperature 0.4) on the DataModule's eval tasks.

    Runs before training, every ``every_n_epochs`` epochs, and after training. Each rank evaluates
    its shard of the tasks; torchmetrics syncs the means across ranks. Logged as ``eval/reward``,
    ``eval/success_rate``, ``eval/engine_calls`` (this rank's generate calls) and ``eval/epoch`` (epochs
    trained before it); every result is also kept in ``history``, and the rollouts go to
    ``<log_dir>/rollouts/eval_<epoch>.jsonl`` (``data.rollout_log``). Every task's success rate is kept in
    ``task_success[label]``; after training, the gain over the evaluation before training is printed (unless a
    ``RunReportCallback`` prints it last) and logged (``eval/success_gain``, ``eval/success_gain_se``) with its
    paired standard error.

    ``eval/time_s`` is the evaluation's rollouts alone; bringing the engine to the policy's weights before them is
    timed apart: ``eval/engine_start_s`` when it started the engine, else ``eval/weight_sync_s``.
    ``log_every_s``: without a terminal, a progress line every so many seconds (``show_progress``).
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
        show_progress: bool = True,
        log_every_s: float = 30.0,
    ) -> None:
        self.every_n_epochs = every_n_epochs
        self.max_tasks = max_tasks
        self.repeats = repeats
        self.params = SamplingParams(temperature, top_p, max_new_tokens, 1, seed)
        self.before_training = before_training
        self.after_training = after_training
        self.show_progress = show_progress
        self.log_every_s = log_every_s
        self.history: list[dict[str, float]] = []
        self.task_success: dict[str, list[float]] = {}
        self.last_task_success: list[float] = []
        self.last_records: list[dict] = []  # this rank's rollout records of the last run, one per task
        self.gain_line: str | None = None  # the before → after gain, once both evaluations ran
        self.print_gain = True  # False: a RunReportCallback prints gain_line as the run's last line

    def run(self, datamodule, pl_module: L.LightningModule, rank: int = 0, world_size: int = 1,
            trainer: L.Trainer | None = None) -> dict[str, float]:
        """Evaluate this rank's shard of the eval tasks; means are synced across ranks. ``trainer``: the
        running one, whose progress display the eval bar joins."""
        tasks = datamodule.eval_task_list(self.max_tasks)
        if not tasks:
            raise ValueError("evaluation needs data.eval_tasks: set it in the config")
        sync = timed_sync(pl_module.rollout_engine)  # every rank reaches this point: safe for collectives
        start = time.perf_counter()
        shard = tasks[rank::world_size]
        with PhaseProgress("", self.show_progress and rank == 0, trainer, self.log_every_s) as progress:
            ctx = rollout_context(datamodule, pl_module, progress)
            trajectories = evaluate_tasks(ctx, shard, self.params, self.repeats)
        elapsed = time.perf_counter() - start
        pl_module.rollout_engine.sleep()  # every rank reaches this point
        n = self.repeats
        self.last_records = [trajectories_record(task, trajectories[i * n : (i + 1) * n]) for i, task in enumerate(shard)]
        per_task = [sum(is_success(t.reward) for t in trajectories[i * n : (i + 1) * n]) / n for i in range(len(shard))]
        self.last_task_success = _in_task_order(per_task, rank, world_size)
        reward, success = MeanMetric().to(pl_module.device), MeanMetric().to(pl_module.device)
        for t in trajectories:
            reward.update(torch.tensor(t.reward, dtype=torch.float32))
            success.update(torch.tensor(float(is_success(t.reward))))
        return {
            "eval/reward": float(reward.compute()),
            "eval/success_rate": float(success.compute()),
            "eval/rollouts": float(len(tasks) * self.repeats),
            "eval/time_s": elapsed,
            "eval/engine_calls": ctx.call_stats()["engine_calls"],  # this rank's
            **{f"eval/{k}": v for k, v in sync.items()},
            **{f"eval/{k}": v for k, v in completion_stats(ctx.generation_totals()).items()},  # this rank's
        }

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str, epoch: int) -> dict[str, float]:
        """Evaluate after ``epoch`` trained epochs: log, print, and save the rollouts."""
        result = self.run(trainer.datamodule, pl_module, trainer.global_rank, trainer.world_size, trainer)
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
            logger.log_metrics({**result, "eval/epoch": float(epoch)}, step=trainer.global_step)
        save_rollouts(trainer, trainer.datamodule.rollout_log, "eval", epoch, self.last_records)
        say(trainer, describe(label, result))
        if gain_line is not None:
            self.gain_line = gain_line
            if self.print_gain:
                say(trainer, gain_line)
        return result

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before_training:
            self.evaluate(trainer, pl_module, "before training", trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        # the last epoch (max_epochs, or a callback such as RolloutTokenBudget stopping the run) is evaluated
        # once, by on_train_end
        last = trainer.should_stop or (trainer.max_epochs is not None and epoch >= trainer.max_epochs)
        if epoch % self.every_n_epochs == 0 and not (last and self.after_training):
            self.evaluate(trainer, pl_module, f"epoch {epoch}", epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after_training:
            self.evaluate(trainer, pl_module, "after training", trainer.current_epoch)
