"""``r3l report RUN_DIR``: a run's key figures and ``curves.png``, from its CSV metrics.

The curves, per epoch: evaluation success rate and reward (x = epochs trained before the evaluation,
0 = before training), base success rate and reward, valid-reflection rate, retry improvement (and
trigger) rate (x = the epoch whose exploration they describe, i.e. after that many trained epochs; an
epoch without retries has no improvement rate).
The end of every ``r3l fit`` draws the same picture next to its CSV (``RunReportCallback``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

EXPLORE_SERIES = {
    "base_success": "explore/base_success_rate",
    "base_reward": "explore/base_reward_mean",
    "valid_reflection": "explore/valid_reflection_rate",
    "retry_improvement": "explore/retry_improvement_rate",
    "retry_trigger": "explore/retry_trigger_rate",
}
EVAL_SERIES = {"eval_success": "eval/success_rate", "eval_reward": "eval/reward"}


@dataclass
class RunCurves:
    """Per-epoch series of one run: ``{name: [(epoch, value), ...]}``; only series the run logged."""

    metrics_path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)  # summed over epochs: tokens, steps, time

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.series.get(name, [])]


def find_metrics(run_dir: str | Path) -> Path:
    """``run_dir/metrics.csv``, or the most recently written ``metrics.csv`` below ``run_dir``."""
    root = Path(run_dir)
    if root.is_file() and root.name.endswith(".csv"):
        return root
    if (root / "metrics.csv").is_file():
        return root / "metrics.csv"
    found = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no metrics.csv under {root}: pass the run directory of an `r3l fit` that had a CSVLogger "
            "(trainer.logger in the config)"
        )
    return found[-1]


def read_curves(metrics_path: str | Path) -> RunCurves:
    """Parse Lightning's CSV metrics (one row per ``log_metrics`` call, empty cells elsewhere)."""
    path = Path(metrics_path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    explore = [r for r in rows if r.get("explore/base_success_rate")]
    evals = [r for r in rows if r.get("eval/success_rate")]
    curves = RunCurves(path)
    explore_steps = [_number(r.get("step")) for r in explore]
    for i, row in enumerate(explore):
        epoch = int(_number(row.get("explore/epoch"), i))
        for name, key in EXPLORE_SERIES.items():
            if row.get(key) and not (name == "retry_improvement" and _number(row.get("explore/retries"), 1.0) == 0):
                curves.series.setdefault(name, []).append((epoch, _number(row[key])))
        for key, value in row.items():
            if value and key.startswith(("explore/tokens_", "explore/optimizer_steps", "explore/time_explore_s")):
                curves.totals[key.removeprefix("explore/")] = curves.totals.get(key.removeprefix("explore/"), 0.0) + _number(value)
    for row in evals:
        # runs logged before eval/epoch existed: epochs whose exploration started before this evaluation
        fallback = sum(s < _number(row.get("step")) for s in explore_steps)
        epoch = int(_number(row.get("eval/epoch"), fallback))
        for name, key in EVAL_SERIES.items():
            if row.get(key):
                curves.series.setdefault(name, []).append((epoch, _number(row[key])))
    curves.totals["train_s"] = sum(_number(r["time/train_s"]) for r in rows if r.get("time/train_s"))
    return curves


def _number(value: str | None, default: float = 0.0) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except ValueError:
        return default


def key_figures(curves: RunCurves) -> str:
    """The report printed by ``r3l report`` and at the end of ``r3l fit``."""
    lines = [f"run metrics: {curves.metrics_path}"]
    evals = curves.series.get("eval_success", [])
    if evals:
        best_epoch, best = max(evals, key=lambda point: point[1])
        lines.append(f"eval success: {evals[0][1]:.3f} before training → {evals[-1][1]:.3f} after {evals[-1][0]} epochs "
                     f"(best {best:.3f} after {best_epoch})")
    rewards = curves.series.get("eval_reward", [])
    if rewards:
        lines.append(f"eval reward:  {rewards[0][1]:.3f} → {rewards[-1][1]:.3f}")
    epochs = sorted({e for name in [*EXPLORE_SERIES, "eval_success"] for e, _ in curves.series.get(name, [])})
    if epochs:
        header = ["epoch", "base success", "base reward", "valid reflections", "retry improved", "eval success"]
        table = [header]
        columns = ["base_success", "base_reward", "valid_reflection", "retry_improvement"]
        lookup = {name: dict(curves.series.get(name, [])) for name in columns + ["eval_success"]}
        for epoch in epochs:
            row = [str(epoch)] + [_cell(lookup[name].get(epoch)) for name in columns]
            row.append(_cell(lookup["eval_success"].get(epoch)))
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
        lines.append("(eval success in the row of epoch k: after k trained epochs)")
    totals = curves.totals
    tokens = ", ".join(f"{k.removeprefix('tokens_')} {v:,.0f}" for k, v in sorted(totals.items()) if k.startswith("tokens_"))
    if tokens:
        lines.append(f"tokens generated: {tokens}")
    lines.append(f"optimizer steps {totals.get('optimizer_steps', 0):.0f} · exploration {totals.get('time_explore_s', 0):.0f} s"
                 f" · training {totals.get('train_s', 0):.0f} s")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot_curves(curves: RunCurves, path: str | Path) -> Path:
    """Four panels (evaluation, base rollouts, valid reflections, retries) saved as a small PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    panels = [
        ("evaluation (after k epochs)", [("eval_success", "success rate"), ("eval_reward", "reward")]),
        ("base rollouts", [("base_success", "success rate"), ("base_reward", "reward")]),
        ("reflections", [("valid_reflection", "valid rate")]),
        ("retries", [("retry_improvement", "improved R' > R"), ("retry_trigger", "triggered")]),
    ]
    for i, (ax, (title, series)) in enumerate(zip(figure.subplots(2, 2, sharex=True).flat, panels)):
        ax.set_title(title, fontsize=10)
        drawn = False
        for name, label in series:
            points = curves.series.get(name, [])
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylim(-0.05, 1.05)
        if i >= 2:
            ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    figure.suptitle(f"{curves.metrics_path.parent}", fontsize=9)
    target = Path(path)
    figure.savefig(target)
    return target


def report(run_dir: str | Path, out: str | Path | None = None) -> tuple[str, Path]:
    """Key figures of the run and its ``curves.png`` (default: next to its ``metrics.csv``)."""
    curves = read_curves(find_metrics(run_dir))
    png = plot_curves(curves, out if out is not None else curves.metrics_path.parent / "curves.png")
    return key_figures(curves), png
