"""Where a run's memory goes: peak RSS per component over one exploration and one training epoch of a config.

    python benchmarks/memory.py [--configs configs/countdown/r3l.yaml configs/scienceworld/r3l.yaml] [r3l fit args]

Each config runs ``r3l fit --config <config> --trainer.max_epochs 1`` (logger, checkpoints, evaluation and export
off: the callbacks are this script's phase marks and ``ExplorationCallback``) in a fresh process; any further
arguments go to every ``r3l fit`` (``--model.model_name_or_path tiny-random-smollm2``). The parent samples the run's
process tree every ``--interval`` seconds (psutil) and sorts the processes into components:

- **trainer**: the ``r3l fit`` process: libraries, policy, AdamW state, gradients, activations and logits, and on
  CPU the vLLM engine too (``VLLMEngine(in_process=True)`` runs vLLM's engine core in this process);
- **engine process**: a separate vLLM engine core (``in_process=False``), when there is one;
- **environment**: ScienceWorld's JVMs (``java`` children of the trainer);
- **other**: any other descendant, by name.

Inside the trainer process the parts are told apart by time: the run marks phase boundaries (libraries imported,
policy loaded, engine created, rollouts, training) with the process's RSS and its kernel high-water mark
(``VmHWM``, reset at every mark through ``/proc/self/clear_refs``), so each phase's trainer peak is exact, not
sampled. Differences between marks are *derived*; sizes computed from tensor shapes (weights, gradients, AdamW
moments, full logits, the engine's configured KV cache) are *counted*; the totals are *sampled* (the sum over the tree at
one instant, so components' own peaks need not add up to it).

Lines per config: the components' sampled peaks, the trainer's phases, the counted sizes; then
``<name>_peak_rss_gb=<total>`` for every config (the name is the config's directory), and last
``peak_rss_gb=<total of the last config>`` (ScienceWorld by default).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import psutil
import torch
from rows import PREFIX, print_row

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_CONFIGS = ("configs/countdown/r3l.yaml", "configs/scienceworld/r3l.yaml")


# ----- inside the run ------------------------------------------------------------------------------
def rss_and_peak() -> tuple[int, int]:
    """(current RSS, high-water mark since the last reset) of this process, in bytes."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM"))
    return rss, hwm


def reset_peak() -> None:
    """Restart the kernel's high-water mark at the current RSS (Linux ≥ 4.0; a no-op where it is refused)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


MARKS: list[dict] = []  # phase boundaries of this run, in order


def mark(phase: str) -> None:
    """Record (wall time, RSS, peak RSS since the previous mark) and restart the peak."""
    rss, peak = rss_and_peak()
    MARKS.append({"phase": phase, "time": time.time(), "rss": rss, "peak_since_previous": peak})
    reset_peak()


class PhaseMarks(L.Callback):
    """Marks the run's phases (fit start, exploration, engine creation, rollouts, training, end) and counts the
    sizes of the policy, its gradients, AdamW's moments, the largest micro-batch's logits and the engine's KV cache.
    Must be the first callback (its epoch start then precedes exploration)."""

    def __init__(self) -> None:
        self.counted: dict[str, float | str] = {}
        self.micro_batches: list[tuple[int, int]] = []  # (rows, padded length) of every training forward

    def on_fit_start(self, trainer, pl_module) -> None:
        mark("fit start")
        engine = pl_module.rollout_engine
        if hasattr(engine, "_create"):  # VLLMEngine: created lazily, at the first weight sync
            create = engine._create

            def create_marked() -> None:
                mark("engine creation")
                create()
                mark("rollouts")

            engine._create = create_marked
        loss = pl_module.micro_batch_loss

        def loss_counted(mb, *args, **kwargs):
            if MARKS[-1]["phase"] != "training":
                mark("training")
            rows, length = mb["input_ids"].shape
            self.micro_batches.append((rows, length))
            return loss(mb, *args, **kwargs)

        pl_module.micro_batch_loss = loss_counted

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        mark("exploration")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        mark("end")
        policy = pl_module.policy
        optimizer = pl_module.optimizers().optimizer
        engine = pl_module.rollout_engine
        self.counted.update(
            policy_bytes=sum(p.numel() * p.element_size() for p in policy.parameters()),
            gradient_bytes=sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad),
            adamw_bytes=sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                            if torch.is_tensor(t) and t.dim() > 0),
            largest_micro_batch_tokens=max((r * n for r, n in self.micro_batches), default=0),
            longest_sequence=max((n for _, n in self.micro_batches), default=0),
            micro_batches=len(self.micro_batches),
            shapes=" ".join(f"{r}x{n}" for r, n in self.micro_batches),
            logits_bytes=max((r * n for r, n in self.micro_batches), default=0) * policy.config.vocab_size * 4,
            engine=type(engine).__name__,
        )
        if hasattr(engine, "kv_cache_gib"):
            dtype = engine._engine_dtype()
            self.counted.update(kv_cache_bytes=engine.kv_cache_gib * 2**30, engine_dtype=dtype,
                                engine_weight_bytes=sum(p.numel() for p in policy.parameters())
                                * (2 if dtype == "bfloat16" else 4))
        pool = getattr(trainer.datamodule.environment, "_pool", None)
        if pool is not None:  # ScienceWorld's JVM pool
            self.counted.update(java_options=pool.java_options, max_jvms=pool.max_jvms)


def run_config(config: str, fit_args: list[str]) -> None:
    """One exploration + training epoch of ``config`` in this process; prints the marks as a row."""
    from r3l_lightning.cli import cli_main  # torch, lightning, transformers

    sys.modules.setdefault("memory", sys.modules[__name__])  # the config's memory.PhaseMarks is this module's
    mark("loading")
    cli = cli_main([
        "fit", "--config", config, *fit_args,
        "--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.default_root_dir", tempfile.mkdtemp(prefix="r3l_memory_"),
        "--data.rollout_log.every_n_epochs", "0",
        "--trainer.callbacks", "[{class_path: memory.PhaseMarks}, "
                               "{class_path: r3l_lightning.callbacks.ExplorationCallback, "
                               "init_args: {show_progress: false}}]",
    ])
    (marks,) = [c for c in cli.trainer.callbacks if isinstance(c, PhaseMarks)]
    print_row({"marks": MARKS, "counted": marks.counted})


# ----- the parent: sampling and the report ---------------------------------------------------------
def component(proc: psutil.Process, trainer_pid: int) -> str:
    if proc.pid == trainer_pid:
        return "trainer"
    name = proc.name()
    if name == "java":
        return "environment"
    if "EngineCore" in name or "EngineCore" in " ".join(proc.cmdline()):
        return "engine process"
    return f"other ({name})"


def sample_run(config: str, fit_args: list[str], interval: float) -> tuple[list[dict], dict, float]:
    """Run ``config`` in a child process; sample its process tree every ``interval`` s. Returns (samples, the
    child's row, wall seconds). A sample: {"time", component: [rss of each process]}."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.time()
        child = subprocess.Popen([sys.executable, __file__, "--run", config, *fit_args], stdout=out,
                                 stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        root = psutil.Process(child.pid)
        samples = []
        while child.poll() is None:
            sample: dict = {"time": time.time()}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    sample.setdefault(component(proc, child.pid), []).append(proc.memory_info().rss)
                except psutil.Error:  # ended between listing and reading
                    pass
            samples.append(sample)
            time.sleep(interval)
        wall = time.time() - start
        out.seek(0)
        text = out.read()
    rows = [line[len(PREFIX):] for line in text.splitlines() if line.startswith(PREFIX)]
    if child.returncode != 0 or not rows:
        raise RuntimeError(f"r3l fit --config {config} failed (exit {child.returncode}):\n{text[-4000:]}")
    return samples, json.loads(rows[-1]), wall


def total(sample: dict, skip: str = "") -> int:
    """The sample's RSS summed over its processes (over all components but ``skip``)."""
    return sum(sum(v) for k, v in sample.items() if k not in ("time", skip))


def report(name: str, samples: list[dict], row: dict, wall: float) -> float:
    """Print one config's figures; returns its peak total in GB: the largest over phases of the trainer's exact
    peak in the phase (kernel high-water mark) plus the other processes' sampled peak in the same phase."""
    marks, counted = row["marks"], row["counted"]
    components = sorted({k for s in samples for k in s if k != "time"})
    print(f"== {name}: one exploration + one training epoch, {wall:.0f} s wall, {len(samples)} samples of the "
          f"process tree (every {(samples[-1]['time'] - samples[0]['time']) / max(len(samples) - 1, 1):.2f} s)")
    print(f"{'component':24s} {'peak GB':>8s} {'processes':>9s}  (sampled)")
    for key in components:
        print(f"{key:24s} {max(sum(s.get(key, [])) for s in samples) / GB:8.2f} "
              f"{max(len(s.get(key, [])) for s in samples):9d}")
    print("by phase: the trainer's RSS at the start and its peak (kernel high-water mark, exact); the other "
          "processes' sampled peak; their sum:")
    peak_total = max(total(s) for s in samples)
    for mark, following in zip(marks, marks[1:]):
        during = [s for s in samples if mark["time"] <= s["time"] <= following["time"]]
        others = max((total(s, skip="trainer") for s in during), default=0)
        trainer_peak = following["peak_since_previous"]
        peak_total = max(peak_total, trainer_peak + others)
        print(f"  {mark['phase']:16s} trainer {mark['rss'] / GB:6.2f} -> peak {trainer_peak / GB:6.2f} GB, "
              f"others {others / GB:5.2f} GB, total {(trainer_peak + others) / GB:6.2f} GB, "
              f"{following['time'] - mark['time']:5.0f} s")
    print(f"  sampled total at its largest: {max(total(s) for s in samples) / GB:.2f} GB (samples can miss a "
          "short spike; the phase sums cannot miss the trainer's)")
    by_phase = {m["phase"]: m for m in marks}

    def part(label: str, size: float, note: str = "") -> None:
        print(f"  {label:38s} {size / GB:+6.2f} GB  {note}".rstrip())

    print("trainer process by part (derived from the marks; counted sizes in brackets):")
    part("libraries (python, torch, transformers)", by_phase["loading"]["rss"])
    part("policy, tokenizer, data", by_phase["fit start"]["rss"] - by_phase["loading"]["rss"],
         f"[weights {counted['policy_bytes'] / GB:.2f}]")
    if "rollouts" in by_phase:
        part("vLLM engine (import, weights, KV)", by_phase["rollouts"]["rss"] - by_phase["engine creation"]["rss"],
             f"[KV cache {counted['kv_cache_bytes'] / GB:.2f}, {counted['engine_dtype']} weights "
             f"{counted['engine_weight_bytes'] / GB:.2f}]")
    else:
        part(f"engine: {counted['engine']}", 0, "(generates with the policy: no weights of its own)")
    explored = by_phase.get("training", by_phase["end"])
    part("held after exploration", explored["rss"] - by_phase.get("rollouts", by_phase["exploration"])["rss"])
    if "training" in by_phase:
        part("training peak above its start", by_phase["end"]["peak_since_previous"] - explored["rss"],
             f"[gradients {counted['gradient_bytes'] / GB:.2f}, AdamW {counted['adamw_bytes'] / GB:.2f}, full fp32 "
             f"logits {counted['logits_bytes'] / GB:.2f} where materialised (largest micro-batch "
             f"{counted['largest_micro_batch_tokens']} tokens × vocab × 4 B; their gradient as much); "
             f"{counted['micro_batches']} micro-batches, longest sequence "
             f"{counted['longest_sequence']}]")
        part("held after training", by_phase["end"]["rss"] - explored["rss"])
        print(f"  micro-batches (rows x padded length): {counted['shapes']}")
    if "java_options" in counted:
        print(f"  environment: up to {counted['max_jvms']} JVMs, {counted['java_options']}")
    return peak_total / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="configs to run, in order; the last one's total is the last line")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples of the process tree")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one config in this process
    args, fit_args = parser.parse_known_args()
    if args.run:
        run_config(args.run, fit_args)
        return
    print(f"cpus: {os.cpu_count()}, memory: {psutil.virtual_memory().total / GB:.1f} GB, "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}; r3l fit args: {' '.join(fit_args) or 'none'}")
    totals = {}
    for config in args.configs:
        name = Path(config).parent.name
        totals[name] = report(name, *sample_run(config, fit_args, args.interval))
    for name, value in totals.items():
        print(f"{name}_peak_rss_gb={value:.2f}")
    print(f"peak_rss_gb={value:.2f}")


if __name__ == "__main__":
    main()
