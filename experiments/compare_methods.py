"""The paper's method comparison at our scale, in one command: R³L, GRPO and R³L's three ablations (optionally
RAFT and OPMD) on the same task, model, seeds and rollout-token budget.

    python experiments/compare_methods.py            # 3 seeds, 3,600 rollout tokens a run
    python experiments/compare_methods.py --quick    # 1 seed, 1,800 rollout tokens a run

Every run is ``r3l fit --config configs/countdown/r3l.yaml [--config configs/methods/<method>.yaml]`` with a
``RolloutTokenBudget`` (generated tokens of base samples, reflections and retries: R³L pays for its
reflections out of the same budget) and an evaluation every ``--eval_every`` epochs. The initial policy is
evaluated once per seed, not once per method. Writes ``<out>/results.md`` (final eval success and reward,
mean ± standard error over seeds; trained tokens; wall time), ``<out>/results.csv`` (every evaluation of
every run) and ``<out>/eval_success.png`` (eval success against rollout tokens, one line per method).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # name -> overlay (None: the task config's R³L, whose reflector is the reference solution)
    "R3L (reference reflector)": None,
    "R3L (policy, paper schema)": "r3l_policy_reflector",
    "R3L (policy, grounded schema)": "r3l_grounded",
    "GRPO": "grpo",
    "R3L w/o pivotal credit": "r3l_no_pivot",
    "R3L w/o amplification": "r3l_no_amplification",
    "R3L w/o reflect-retry": "r3l_no_reflect_retry",
}
# explore/ statistics summed over a run's epochs: the reflect → retry rates of the table
RATE_COUNTS = {"informative reflections": ("informative_reflections", "reflections"),
               "retries improved": ("retries_improved", "retries")}
OPTIONAL = {"RAFT": "raft", "OPMD": "opmd"}
# R³L as the paper describes it and as the authors' code runs it (docs/fidelity_authors_code.md): --methods only
FIDELITY = {"R3L (paper)": "r3l_paper", "R3L (authors' code)": "r3l_authors_code"}


def run_command(args, overlay: str | None, seed: int, out: Path, before_training: bool) -> list[str]:
    """The ``r3l fit`` command line of one (method, seed) run."""
    cmd = [sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(args.config)]
    if overlay is not None:
        cmd += ["--config", str(ROOT / "configs" / "methods" / f"{overlay}.yaml")]
    cmd += [
        "--seed_everything", str(seed), "--data.seed", str(seed), "--data.explorer.init_args.seed", str(seed),
        "--trainer.max_epochs", "1000", "--trainer.default_root_dir", str(out),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--trainer.logger.name", "csv", "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", "r3l_lightning.callbacks.ExplorationCallback",
        "--trainer.callbacks.show_progress", "false",
        "--trainer.callbacks+", "r3l_lightning.callbacks.RolloutTokenBudget",
        "--trainer.callbacks.max_tokens", str(args.budget),
        "--trainer.callbacks+", "r3l_lightning.callbacks.EvalCallback",
        "--trainer.callbacks.every_n_epochs", str(args.eval_every),
        "--trainer.callbacks.max_new_tokens", str(args.eval_max_new_tokens),
        "--trainer.callbacks.max_tasks", str(args.eval_tasks),
        "--trainer.callbacks.repeats", str(args.eval_repeats),
        "--trainer.callbacks.before_training", str(before_training).lower(),
    ]
    if args.operators is not None:  # Countdown's task mix, for training and evaluation alike
        cmd += ["--data.train_tasks.init_args.operators", args.operators,
                "--data.eval_tasks.init_args.operators", args.operators]
    return cmd + args.extra


def read_run(out: Path) -> dict:
    """Evaluations (rollout tokens, success, reward) and totals of one run from its metrics.csv."""
    (metrics,) = out.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    spent = 0.0
    evals = []
    trained = 0.0
    counts = {key: 0.0 for pair in RATE_COUNTS.values() for key in pair}
    for row in rows:  # rows are in logging order: a budget row ends each epoch, evaluations follow it
        if row.get("budget/rollout_tokens"):
            spent = float(row["budget/rollout_tokens"])
        if row.get("train/tokens"):
            trained += float(row["train/tokens"])
        if row.get("eval/success_rate"):
            evals.append((spent, float(row["eval/success_rate"]), float(row["eval/reward"])))
        for key in counts:
            if row.get(f"explore/{key}"):
                counts[key] += float(row[f"explore/{key}"])
    return {"evals": evals, "trained_tokens": trained, "counts": counts}


def rate(runs: list[dict], name: str) -> str:
    """A reflect → retry rate over all of ``runs``' epochs (``RATE_COUNTS``), as ``k/n = r``; empty without any."""
    hits, total = RATE_COUNTS[name]
    k, n = (sum(r.get("counts", {}).get(key, 0.0) for r in runs) for key in (hits, total))
    return f"{k:.0f}/{n:.0f} = {k / n:.2f}" if n else ""


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def plot(results: dict, initial: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in results.items():
        # mean over seeds of the i-th evaluation (seeds evaluate at the same epochs, tokens differ slightly); a
        # seed that ran an epoch more has one evaluation more: every line ends at its runs' final evaluations
        n_points = min(len(r["evals"]) for r in runs)
        points = [r["evals"][: n_points - 1] + [r["evals"][-1]] for r in runs]
        xs = [0.0] + [sum(p[i][0] for p in points) / len(runs) for i in range(n_points)]
        ys = [sum(initial[s] for s in initial) / len(initial)]
        ys += [sum(p[i][1] for p in points) / len(runs) for i in range(n_points)]
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("generated rollout tokens (base + reflection + retry)")
    ax.set_ylabel("eval success rate")
    ax.set_title(f"eval success vs rollout tokens: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "countdown" / "r3l.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=None,
                        help="generated rollout tokens per run (default 3,600, --quick 1,800; an R³L epoch of the "
                             "main job generates ~1,800: 4 tasks × (4 base + 4 reflections + 4 retries))")
    parser.add_argument("--eval_every", type=int, default=3, help="epochs between evaluations")
    parser.add_argument("--eval_tasks", type=int, default=64)
    parser.add_argument("--eval_repeats", type=int, default=4, help="samples per eval task (avg@k)")
    parser.add_argument("--eval_max_new_tokens", type=int, default=24)
    parser.add_argument("--operators", type=lambda s: None if s == "none" else s,
                        choices=["any", "balanced", None], default="balanced",
                        help="CountdownTasks(operators=...) for training and eval: balanced (default) has no "
                             "'a + b' shortcut; none: the config's own tasks")
    parser.add_argument("--optional", action="store_true", help="also run RAFT and OPMD")
    parser.add_argument("--methods", nargs="+", help="a subset of the method names (also the optional ones and "
                                                     f"{', '.join(repr(m) for m in FIDELITY)})")
    parser.add_argument("--quick", action="store_true", help="the first seed only")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the table and the picture from the finished runs under --out")
    parser.add_argument("extra", nargs="*", help="more r3l fit arguments for every run (after --)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.budget is None:
        args.budget = 1800 if args.quick else 3600
    methods = dict(METHODS, **(OPTIONAL if args.optional else {}))
    if args.methods:
        known = dict(METHODS, **OPTIONAL, **FIDELITY)
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            parser.error(f"unknown --methods {unknown}; known: {', '.join(known)}")
        methods = {m: known[m] for m in args.methods}
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    initial: dict[int, float] = {}
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in args.seeds:
        for i, (method, overlay) in enumerate(methods.items()):
            out = args.out / method.replace(" ", "_").replace("/", "") / f"seed{seed}"
            if args.report and not (out / "wall_s").exists():
                continue
            if not args.report:
                start = time.perf_counter()
                log = (args.out / f"{out.parent.name}-seed{seed}.log").open("w")
                cmd = run_command(args, overlay, seed, out, before_training=(i == 0))
                subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
                (out / "wall_s").write_text(f"{time.perf_counter() - start:.1f}\n")
            run = read_run(out)
            run["seed"], run["wall_s"] = seed, float((out / "wall_s").read_text())
            if i == 0:  # the first method's run evaluated the initial policy of this seed
                initial[seed] = run["evals"].pop(0)[1]
            results[method].append(run)
            final = run["evals"][-1]
            print(f"{method:28s} seed {seed}: eval success {final[1]:.3f} reward {final[2]:.3f} after "
                  f"{final[0]:.0f} rollout tokens ({run['wall_s']:.0f} s)", flush=True)
    results = {m: runs for m, runs in results.items() if runs}
    if not results or not initial:
        raise SystemExit(f"no finished runs under {args.out} (the first method of a seed evaluates its initial policy)")
    write_results(args, results, initial)


def write_results(args, results: dict, initial: dict) -> None:
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "rollout_tokens", "eval_success", "eval_reward"])
        for seed, success in initial.items():
            writer.writerow(["initial policy", seed, 0, success, ""])
        for method, runs in results.items():
            for run in runs:
                seed = run["seed"]
                for tokens, success, reward in run["evals"]:
                    writer.writerow([method, seed, tokens, success, reward])
    init_mean, init_se = mean_se(list(initial.values()))
    lines = [
        f"{args.config.name}, seeds {', '.join(map(str, initial))}, "
        f"budget {args.budget:,} generated rollout tokens per run, tasks: operators {args.operators or 'as configured'}, "
        f"eval on {args.eval_tasks} held-out tasks × {args.eval_repeats} samples.",
        "",
        "| method | seeds | eval success | eval reward | informative reflections | retries improved | rollout tokens "
        "| trained tokens | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| initial policy | {len(initial)} | {init_mean:.3f} ± {init_se:.3f} | | | | 0 | 0 | |",
    ]
    for method, runs in results.items():
        success = mean_se([r["evals"][-1][1] for r in runs])
        reward = mean_se([r["evals"][-1][2] for r in runs])
        tokens = sum(r["evals"][-1][0] for r in runs) / len(runs)
        trained = sum(r["trained_tokens"] for r in runs) / len(runs)
        wall = sum(r["wall_s"] for r in runs) / len(runs)
        lines.append(f"| {method} | {len(runs)} | {success[0]:.3f} ± {success[1]:.3f} | {reward[0]:.3f} ± {reward[1]:.3f} | "
                     f"{rate(runs, 'informative reflections')} | {rate(runs, 'retries improved')} | "
                     f"{tokens:,.0f} | {trained:,.0f} | {wall / 60:.1f} min |")
    lines += ["", "Mean ± standard error over seeds (final evaluation of each run); informative reflections and "
              "retries improved: over every epoch of every seed; rollout tokens, trained tokens and wall time: means "
              "per run."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, initial, args.out / "eval_success.png", args.config.name)
    print("\n".join(lines))
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.csv'}, {args.out / 'eval_success.png'}")


if __name__ == "__main__":
    main()
