"""``ExplorationCallback``: at the start of every epoch, roll out the next tasks and fill the buffer."""

from __future__ import annotations

import copy
import time
from collections.abc import Collection
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from r3l_lightning.callbacks.preemption import raise_if_preempted
from r3l_lightning.console import PhaseProgress, say
from r3l_lightning.data import ExperienceDataModule
from r3l_lightning.explore.episodes import RolloutContext, completion_stats
from r3l_lightning.rollout_log import save_rollouts
from r3l_lightning.trajectory import SAMPLE_KINDS


# this callback's own statistics averaged over ranks (the explorer's are in its ``averaged_stats``; every rank's
# engine counts alike); every other statistic is summed
AVERAGED_STATS = frozenset({"engine_starts", "engine_weight_syncs", "engine_syncs_skipped"})  # and every time_*


def rollout_context(datamodule: L.LightningDataModule, pl_module: L.LightningModule, progress=None) -> RolloutContext:
    """The environment (from the DataModule), the engine and chat format (from the module); a preemption signal
    stops the rollout at its next generate call or environment step."""
    if not isinstance(datamodule, ExperienceDataModule):
        raise TypeError("exploration and evaluation callbacks need an ExperienceDataModule as `data`")
    return RolloutContext(datamodule.environment, pl_module.rollout_engine, pl_module.chat, progress,
                          stop_point=partial(raise_if_preempted, pl_module._trainer))


def timed_sync(engine) -> dict[str, float]:
    """``engine.sync_weights()``, timed: ``{"engine_start_s": s}`` when the call started the engine (an engine that
    counts its ``starts``), else ``{"weight_sync_s": s}``."""
    starts = getattr(engine, "starts", 0)
    start = time.perf_counter()
    engine.sync_weights()
    seconds = time.perf_counter() - start
    return {"engine_start_s" if getattr(engine, "starts", 0) > starts else "weight_sync_s": seconds}


def reduce_max_fn(trainer: L.Trainer):
    """Elementwise max over ranks of a list of ints (None when single-process)."""
    if trainer.world_size == 1:
        return None

    def reduce_max(values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.long, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor.tolist()

    return reduce_max


def reduce_stats(trainer: L.Trainer, stats: dict[str, float], averaged: Collection[str]) -> dict[str, float]:
    """Statistics over all ranks: those named in ``averaged`` and every ``time_*`` one (seconds the ranks spent side
    by side) are averaged, every ``completion_len_max_*`` one is the max, every other one is summed (a key missing on
    a rank counts as 0)."""
    if trainer.world_size == 1:
        return stats
    gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, sorted(stats))
    keys = sorted(set().union(*gathered))
    stats = {k: stats.get(k, 0.0) for k in keys}
    tensor = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=trainer.strategy.root_device)
    maxima = tensor.clone()
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    total = trainer.strategy.reduce(tensor, reduce_op="sum")
    reduced = {}
    for key, value, largest in zip(keys, total.tolist(), maxima.tolist()):
        if key.startswith("completion_len_max_"):
            reduced[key] = float(largest)
        else:
            reduced[key] = float(value) / (trainer.world_size if key in averaged or key.startswith("time_") else 1)
    return reduced


def epoch_summary(epoch: int, stats: dict[str, float], train_s: float, no_signal_steps: int | None = None) -> str:
    """One console line per epoch, e.g. ``epoch 3 | base 0.31 | reflections 16: valid 14, informative 9 |
    retries 12 → improved 5, same as base 2 | distill 12 sft 5 | zero-spread groups 0.62, nonzero adv 0.31 |
    explore 17 s | train 2 steps (1 without signal) 41 s`` (parts whose statistics the explorer does not report
    are left out). A report that parses but says nothing a retry can act on (it copies the prompt, its suggestion
    is empty) is valid, not informative; a retry whose response at the pivot is the base's, word for word, is
    "same as base"; a step without signal (``no_signal_steps``) trained nothing: every sample's weight was 0."""
    parts = [f"epoch {epoch}", f"base {stats.get('base_success_rate', 0.0):.2f}"]
    if "reflections" in stats:
        reflections = stats["reflections"]
        valid = stats.get("valid_reflections", reflections - stats.get("invalid_reflections", 0.0))
        part = f"reflections {reflections:.0f}: valid {valid:.0f}"
        if "informative_reflections" in stats:
            part += f", informative {stats['informative_reflections']:.0f}"
        parts.append(part)
    if "retries" in stats:
        part = f"retries {stats['retries']:.0f} → improved {stats.get('retries_improved', 0.0):.0f}"
        if "retry_same_as_base_rate" in stats:
            part += f", same as base {stats['retry_same_as_base_rate'] * stats['retries']:.0f}"
        parts.append(part)
    counted = [kind for kind in SAMPLE_KINDS if f"samples_{kind}" in stats]
    samples = [f"{kind} {stats[f'samples_{kind}']:.0f}" for kind in counted
               if SAMPLE_KINDS[kind].objective != "sft" and kind != "base"
               and (stats[f"samples_{kind}"] or kind == "distill")]
    sft = [stats[f"samples_{kind}"] for kind in counted if SAMPLE_KINDS[kind].objective == "sft"]
    if sft:
        samples.append(f"sft {sum(sft):.0f}")
    if samples:
        parts.append(" ".join(samples))
    if "frac_reward_zero_std" in stats:
        parts.append(f"zero-spread groups {stats['frac_reward_zero_std']:.2f}, "
                     f"nonzero adv {stats.get('frac_nonzero_advantage', 0.0):.2f}")
    parts.append(f"explore {stats.get('time_explore_s', 0.0):.0f} s")
    steps = f"train {stats.get('optimizer_steps', 0.0):.0f} steps"
    if no_signal_steps:
        steps += f" ({no_signal_steps} without signal)"
    parts.append(f"{steps} {train_s:.0f} s")
    return " | ".join(parts)


def engine_counts(engine) -> dict[str, float]:
    """Run totals of an engine that holds its own weights (vLLM): start-ups, weight syncs, and sync points
    skipped because no optimizer step happened since the last sync; empty for one that samples the policy."""
    names = {"starts": "engine_starts", "syncs": "engine_weight_syncs", "syncs_skipped": "engine_syncs_skipped"}
    return {key: float(getattr(engine, attr)) for attr, key in names.items() if hasattr(engine, attr)}


class ExplorationCallback(L.Callback):
    """At every epoch start, runs the DataModule's explorer on its next ``tasks_per_epoch`` tasks.

    Each rank explores its own shard of the tasks with the module's rollout engine, puts the groups
    and SFT samples into the DataModule's buffer, and agrees with the other ranks on the number of
    optimizer steps. Statistics are logged under ``explore/``, the engine's generate calls among them
    (``explore/engine_calls``, and ``explore/engine_calls_<phase>`` per phase: base, reflection, retry), and per
    phase the completions' count, mean and max length, clipped fraction and generation throughput
    (:func:`~r3l_lightning.explore.episodes.completion_stats`); the
    explored groups go to the rollout log (``data.rollout_log``); progress bars show the phases
    (``show_progress``; without a terminal, a line every ``log_every_s`` seconds) and one summary line per epoch
    is printed when its training ends. ``explore/time_explore_s`` is the rollouts alone; bringing the engine to the
    policy's weights before them is ``explore/time_engine_start_s`` when it started the engine, else
    ``explore/time_weight_sync_s``. An exploration stopped
    by preemption leaves the DataModule as it was before it (task cursor, explorer state), so the checkpoint
    written then redoes it on resume.
    """

    def __init__(self, show_progress: bool = True, log_every_s: float = 30.0) -> None:
        self.show_progress = show_progress
        self.log_every_s = log_every_s
        self.last_stats: dict[str, float] = {}
        self._epoch_started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule: ExperienceDataModule = trainer.datamodule
        sync = timed_sync(pl_module.rollout_engine)  # every rank reaches this point: safe for collectives
        before = copy.deepcopy(datamodule.state_dict())
        tasks = datamodule.next_train_tasks(datamodule.tasks_per_epoch, trainer.global_rank, trainer.world_size)
        epoch = trainer.current_epoch
        start = time.perf_counter()
        with PhaseProgress(f"epoch {epoch}", self.show_progress and trainer.is_global_zero, trainer,
                           self.log_every_s) as progress:
            ctx = rollout_context(datamodule, pl_module, progress)
            try:
                result = datamodule.explorer.explore(tasks, ctx)
            except SIGTERMException:
                datamodule.load_state_dict(before)  # the checkpoint saved now redoes this exploration
                raise
        explore_s = time.perf_counter() - start
        pl_module.rollout_engine.sleep()  # every rank reaches this point: free the engine's memory for training
        datamodule.buffer.put(result.groups, result.sft)
        steps = datamodule.plan_epoch(trainer.world_size, reduce_max_fn(trainer))
        stats = dict(result.stats, **ctx.call_stats(), **ctx.generation_totals(), time_explore_s=explore_s,
                     optimizer_steps=float(steps), **{f"time_{k}": v for k, v in sync.items()})
        stats.update(engine_counts(pl_module.rollout_engine))
        self.last_stats = reduce_stats(trainer, stats, datamodule.explorer.averaged_stats | AVERAGED_STATS)
        self.last_stats.update(completion_stats(self.last_stats))
        metrics = {f"explore/{k}": v for k, v in self.last_stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "explore/epoch": float(epoch)}, step=trainer.global_step)
        save_rollouts(trainer, datamodule.rollout_log, "train", epoch, result.records)
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train_s = time.perf_counter() - self._epoch_started
        no_signal = getattr(pl_module, "no_signal_steps_in_epoch", None)  # R3LModule counts them (rank 0's)
        metrics = {"time/train_s": train_s}
        if no_signal is not None:
            metrics["train/no_signal_steps"] = float(no_signal)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        say(trainer, epoch_summary(trainer.current_epoch, self.last_stats, train_s, no_signal))
