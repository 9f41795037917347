"""``r3l report RUN_DIR``: a run's key figures and ``curves.png``, from its CSV metrics.

Per-epoch series: evaluation success rate and reward (x = epochs trained before the evaluation, 0 = before
training); base success rate and reward, valid and informative reflection rates, retry improvement, trigger and
same-as-base rates, the fraction of groups with zero reward spread and of samples with a nonzero advantage (x = the
epoch whose exploration they describe, i.e. after that many trained epochs; an epoch without retries has no retry
rates). Per-step series: loss, gradient norm before clipping, entropy, the advantage range, and whether the step
had no signal (every sample's weight 0). ``curves.png`` draws them against epochs, optimizer steps or rollout tokens
(``--x``). The end of every ``r3l fit`` draws the same picture next to its CSV (``RunReportCallback``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

EXPLORE_SERIES = {
    "base_success": "explore/base_success_rate",
    "base_reward": "explore/base_reward_mean",
    "valid_reflection": "explore/valid_reflection_rate",
    "informative_reflection": "explore/informative_reflection_rate",
    "retry_improvement": "explore/retry_improvement_rate",
    "retry_trigger": "explore/retry_trigger_rate",
    "retry_same_as_base": "explore/retry_same_as_base_rate",
    "zero_spread_groups": "explore/frac_reward_zero_std",
    "nonzero_advantage": "explore/frac_nonzero_advantage",
}
RETRY_RATES = ("retry_improvement", "retry_same_as_base")  # undefined in an epoch without retries
EVAL_SERIES = {"eval_success": "eval/success_rate", "eval_reward": "eval/reward"}
STEP_SERIES = {
    "loss": "train/loss", "rl_loss": "train/rl_loss", "sft_loss": "train/sft_loss", "grad_norm": "train/grad_norm",
    "entropy": "train/entropy", "advantage_mean": "train/advantage_mean", "advantage_min": "train/advantage_min",
    "advantage_max": "train/advantage_max", "no_signal_step": "train/no_signal_step",
}
COUNTS = ("reflections", "valid_reflections", "informative_reflections", "retries", "retries_improved",
          "optimizer_steps", "time_explore_s")  # explore/ statistics summed over epochs in ``totals``
XAxis = Literal["epoch", "step", "tokens"]
X_LABELS = {"epoch": "epochs trained", "step": "optimizer steps", "tokens": "rollout tokens generated for training"}


@dataclass
class RunCurves:
    """One run's series: per epoch ``series`` ``{name: [(epoch, value), ...]}``, per optimizer step ``step_series``
    ``{name: [(step, value), ...]}`` (only those the run logged); ``epochs``: per explored epoch its first step and
    the rollout tokens generated before it, ``(epoch, step, tokens)``, and ``epoch_tokens`` its own per phase; ``totals``: counts summed over epochs (tokens, steps, time…)."""

    metrics_path: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    step_series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    epochs: list[tuple[int, int, float]] = field(default_factory=list)
    epoch_tokens: list[dict[str, float]] = field(default_factory=list)  # per explored epoch: tokens_<phase>
    totals: dict[str, float] = field(default_factory=dict)
    last_step: int = 0

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.series.get(name, [])]

    def no_signal_steps(self, epoch: int | None = None) -> int:
        """Optimizer steps (of ``epoch``, or of the run) whose loss was 0 because every sample's weight was 0."""
        return sum(v > 0 for step, v in self.step_series.get("no_signal_step", [])
                   if epoch is None or self.epoch_of_step(step) == epoch)

    def epoch_of_step(self, step: int) -> int:
        """The epoch that optimizer step ``step`` (the count after it) belongs to."""
        return max((e for e, first, _ in self.epochs if first < step), default=0)

    def to_x(self, epoch: float, axis: XAxis) -> float:
        """A (fractional) epoch on ``axis``: the optimizer steps, or the rollout tokens generated for training, before
        it (linear within an epoch)."""
        if axis == "epoch" or not self.epochs:
            return epoch
        anchors = [(float(e), float(step), tokens) for e, step, tokens in self.epochs]
        end = anchors[-1][0] + 1
        anchors.append((end, float(self.last_step), self.totals.get("rollout_tokens", 0.0)))
        column = 1 if axis == "step" else 2
        return _interpolate(epoch, [a[0] for a in anchors], [a[column] for a in anchors])

    def step_to_epoch(self, step: int) -> float:
        """An optimizer step (the count after it) as a fractional epoch: epoch e's n-th of N steps is e + n / N."""
        starts = [(e, first) for e, first, _ in self.epochs]
        if not starts:
            return float(step)
        starts.append((starts[-1][0] + 1, self.last_step))
        return _interpolate(float(step), [float(s) for _, s in starts], [float(e) for e, _ in starts])


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear ``y(x)`` through the points (``xs`` non-decreasing), clamped at the ends."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


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
    curves = RunCurves(path, last_step=int(max((_number(r.get("step")) for r in rows), default=0)))
    explore_steps = [_number(r.get("step")) for r in explore]
    tokens_before = 0.0
    totals = curves.totals
    for i, row in enumerate(explore):
        epoch = int(_number(row.get("explore/epoch"), i))
        no_retries = _number(row.get("explore/retries"), 1.0) == 0
        for name, key in EXPLORE_SERIES.items():
            if row.get(key) and not (name in RETRY_RATES and no_retries):
                curves.series.setdefault(name, []).append((epoch, _number(row[key])))
        curves.epochs.append((epoch, int(_number(row.get("step"))), tokens_before))
        for key, value in row.items():
            name = key.removeprefix("explore/")
            if value and (name.startswith(("tokens_", "samples_", "uninformative_reflection_")) or name in COUNTS):
                totals[name] = totals.get(name, 0.0) + _number(value)
        retries = _number(row.get("explore/retries"))
        totals["retries_same_as_base"] = (totals.get("retries_same_as_base", 0.0)
                                          + round(retries * _number(row.get("explore/retry_same_as_base_rate"))))
        curves.epoch_tokens.append({k.removeprefix("explore/"): _number(v) for k, v in row.items()
                                    if k.startswith("explore/tokens_") and v})
        tokens_before += sum(curves.epoch_tokens[-1].values())
    totals["rollout_tokens"] = tokens_before
    for row in evals:
        # runs logged before eval/epoch existed: epochs whose exploration started before this evaluation
        fallback = sum(s < _number(row.get("step")) for s in explore_steps)
        epoch = int(_number(row.get("eval/epoch"), fallback))
        for name, key in EVAL_SERIES.items():
            if row.get(key):
                curves.series.setdefault(name, []).append((epoch, _number(row[key])))
    for row in rows:
        if row.get("train/loss"):
            for name, key in STEP_SERIES.items():
                if row.get(key):
                    curves.step_series.setdefault(name, []).append((int(_number(row.get("step"))), _number(row[key])))
    totals["train_s"] = sum(_number(r["time/train_s"]) for r in rows if r.get("time/train_s"))
    return curves


def _number(value: str | None, default: float = 0.0) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except ValueError:
        return default


TABLE = (  # (header, per-epoch series)
    ("base success", "base_success"), ("valid refl", "valid_reflection"), ("informative", "informative_reflection"),
    ("retry improved", "retry_improvement"), ("retry = base", "retry_same_as_base"),
    ("zero-spread groups", "zero_spread_groups"), ("nonzero adv", "nonzero_advantage"),
)


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
        columns = [(header, name) for header, name in TABLE if name in curves.series]
        header = ["epoch"] + [h for h, _ in columns] + (["no-signal steps"] if curves.epochs else []) + ["eval success"]
        steps = {e: first for e, first, _ in curves.epochs}
        ends = {e: steps.get(e + 1, curves.last_step) for e in steps}
        lookup = {name: dict(curves.series.get(name, [])) for _, name in columns + [("", "eval_success")]}
        table = [header]
        for epoch in epochs:
            row = [str(epoch)] + [_cell(lookup[name].get(epoch)) for _, name in columns]
            if curves.epochs:
                row.append(f"{curves.no_signal_steps(epoch)}/{ends[epoch] - steps[epoch]}" if epoch in steps else "–")
            row.append(_cell(lookup["eval_success"].get(epoch)))
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
        lines.append("(eval success in the row of epoch k: after k trained epochs; no-signal steps: steps whose loss "
                     "was 0 because every sample's weight was 0)")
    lines += _mechanism_lines(curves)
    totals = curves.totals
    tokens = ", ".join(f"{k.removeprefix('tokens_')} {v:,.0f}" for k, v in sorted(totals.items()) if k.startswith("tokens_"))
    if tokens:
        lines.append(f"tokens generated: {tokens}")
    steps_line = f"optimizer steps {totals.get('optimizer_steps', 0):.0f}"
    if "no_signal_step" in curves.step_series:
        steps_line += f" ({curves.no_signal_steps()} without signal)"
    lines.append(f"{steps_line} · exploration {totals.get('time_explore_s', 0):.0f} s"
                 f" · training {totals.get('train_s', 0):.0f} s")
    return "\n".join(lines)


def _mechanism_lines(curves: RunCurves) -> list[str]:
    """Reflections, retries and SFT samples over the whole run (only what the explorer reported)."""
    totals = curves.totals
    lines = []
    if "reflections" in totals:
        reflections = totals["reflections"]
        line = f"reflections {reflections:.0f}: valid {totals.get('valid_reflections', 0):.0f}"
        if "informative_reflections" in totals:
            line += f", informative {totals['informative_reflections']:.0f} ({_share(totals['informative_reflections'], reflections)})"
        reasons = {k.removeprefix("uninformative_reflection_"): v for k, v in sorted(totals.items())
                   if k.startswith("uninformative_reflection_") and v}
        if reasons:
            line += "; uninformative: " + ", ".join(f"{k} {v:.0f}" for k, v in reasons.items())
        lines.append(line)
    if "retries" in totals:
        retries = totals["retries"]
        lines.append(f"retries {retries:.0f}: improved {totals.get('retries_improved', 0):.0f} "
                     f"({_share(totals.get('retries_improved', 0), retries)}), same as base "
                     f"{totals.get('retries_same_as_base', 0):.0f}")
    sft = {k.removeprefix("samples_"): v for k, v in sorted(totals.items()) if k.startswith("samples_sft")}
    if sft:
        lines.append(f"sft samples {sum(sft.values()):.0f} (" + ", ".join(f"{k} {v:.0f}" for k, v in sft.items()) + ")")
    return lines


def _share(count: float, total: float) -> str:
    return f"{count / total:.0%}" if total else "–"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


PANELS = (  # (title, y label, [(series, label, style)], per-step?)
    ("evaluation", "rate / mean reward", [("eval_success", "success rate", "-"), ("eval_reward", "reward", "--")], False),
    ("base rollouts", "rate / mean reward", [("base_success", "success rate", "-"), ("base_reward", "reward", "--")],
     False),
    ("reflections", "fraction of reflections",
     [("valid_reflection", "valid", "-"), ("informative_reflection", "informative", "--")], False),
    ("retries", "fraction", [("retry_improvement", "improved R' > R", "-"), ("retry_trigger", "triggered (of bases)", "--"),
                             ("retry_same_as_base", "same as base at pivot", ":")], False),
    ("training signal", "fraction", [("zero_spread_groups", "groups with zero reward spread", "-"),
                                     ("nonzero_advantage", "samples with nonzero advantage", "--")], False),
    ("loss", "loss per step", [("loss", "loss", "-"), ("rl_loss", "RL", "--"), ("sft_loss", "SFT", ":")], True),
    ("gradient norm", "global norm before clipping", [("grad_norm", "grad norm", "-")], True),
    ("entropy", "mean token entropy (nats)", [("entropy", "entropy", "-")], True),
    ("advantages", "advantage of RL samples", [("advantage_mean", "mean", "-")], True),
)
RATE_PANELS = {"evaluation", "base rollouts", "reflections", "retries", "training signal"}


def plot_curves(curves: RunCurves, path: str | Path, x: XAxis = "epoch") -> Path:
    """Ten panels (evaluation, base rollouts, reflections, retries, training signal, loss, gradient norm, entropy,
    advantages, rollout tokens per epoch) against ``x`` (epochs, optimizer steps or rollout tokens), as a PNG."""
    target = Path(path)
    curves_figure(curves, x).savefig(target)
    return target


def curves_figure(curves: RunCurves, x: XAxis = "epoch"):
    """The matplotlib ``Figure`` of :func:`plot_curves` (1600 × 900 px)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_LABELS:
        raise ValueError(f"x must be one of {', '.join(X_LABELS)}, got {x!r}")
    figure = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(2, 5).flat)
    for ax, (title, ylabel, series, per_step) in zip(axes, PANELS):
        drawn = _draw_panel(ax, curves, series, per_step, x)
        if title == "advantages" and "advantage_min" in curves.step_series:
            points = [(curves.to_x(curves.step_to_epoch(s), x), v) for s, v in curves.step_series["advantage_min"]]
            highs = [v for _, v in curves.step_series.get("advantage_max", [])]
            if len(highs) == len(points):
                ax.fill_between([p for p, _ in points], [v for _, v in points], highs, alpha=0.25, label="min–max")
                drawn = True
        if title == "loss" and "no_signal_step" in curves.step_series:
            silent = [curves.to_x(curves.step_to_epoch(s), x) for s, v in curves.step_series["no_signal_step"] if v > 0]
            if silent:
                ax.plot(silent, [0.0] * len(silent), "x", color="crimson", label="no-signal step (loss 0)")
        _finish(ax, title, ylabel, x, drawn, title in RATE_PANELS)
    _draw_tokens(axes[9], curves, x)
    figure.suptitle(f"{curves.metrics_path.parent}", fontsize=10)
    return figure


def _draw_panel(ax, curves: RunCurves, series, per_step: bool, x: XAxis) -> bool:
    drawn: dict[str, list[float]] = {}
    for name, label, style in series:
        source = curves.step_series if per_step else curves.series
        points = source.get(name, [])
        if not points:
            continue
        values = [v for _, v in points]
        same = next((other for other, seen in drawn.items() if seen == values), None)
        if same is not None:  # e.g. Countdown's reward is its success: one line, both names
            line = next(line for line in ax.get_lines() if line.get_label() == same)
            line.set_label(f"{same} = {label}")
            drawn[f"{same} = {label}"] = drawn.pop(same)
            continue
        xs = [curves.to_x(curves.step_to_epoch(p) if per_step else p, x) for p, _ in points]
        ax.plot(xs, values, linestyle=style, marker="" if per_step and len(points) > 20 else "o", markersize=4,
                label=label)
        drawn[label] = values
    return bool(drawn)


def _draw_tokens(ax, curves: RunCurves, x: XAxis) -> None:
    """Rollout tokens generated per epoch, by phase (base, reflection, retry…), stacked at the epoch's start."""
    phases = sorted(k for k in curves.totals if k.startswith("tokens_"))
    if not curves.epochs or not phases:
        _finish(ax, "rollout tokens", "tokens per epoch", x, False, False)
        return
    rows = curves.epoch_tokens
    xs = [curves.to_x(e, x) for e, _, _ in curves.epochs]
    bottom = [0.0] * len(xs)
    width = min((b - a for a, b in zip(xs, xs[1:]) if b > a), default=1.0) * 0.8
    for phase in phases:
        values = [row.get(phase, 0.0) for row in rows]
        ax.bar(xs, values, width=width, bottom=bottom, align="edge", label=phase.removeprefix("tokens_"))
        bottom = [b + v for b, v in zip(bottom, values)]
    _finish(ax, "rollout tokens", "tokens per epoch", x, True, False)


def _finish(ax, title: str, ylabel: str, x: XAxis, drawn: bool, rate: bool) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlabel(X_LABELS[x], fontsize=9)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="gray")
    if rate:
        ax.set_ylim(-0.05, 1.05)
    if x != "tokens":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def report(run_dir: str | Path, out: str | Path | None = None, x: XAxis = "epoch") -> tuple[str, Path]:
    """Key figures of the run and its ``curves.png`` (default: next to its ``metrics.csv``) against ``x``."""
    curves = read_curves(find_metrics(run_dir))
    png = plot_curves(curves, out if out is not None else curves.metrics_path.parent / "curves.png", x)
    return key_figures(curves), png
