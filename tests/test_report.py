"""``r3l report``: key figures and curves.png from a run's CSV metrics."""

from __future__ import annotations

import csv

import pytest

from r3l_lightning.command import run_tool
from r3l_lightning.report import find_metrics, key_figures, read_curves

# Lightning's CSVLogger: one row per log_metrics call, the union of all keys as columns, empty cells elsewhere.
# Two epochs of 2 optimizer steps each; evaluation before training and after 2 epochs.
ROWS = [
    {"step": 0, "eval/epoch": 0, "eval/success_rate": 0.25, "eval/reward": 0.4},
    {"step": 0, "explore/epoch": 0, "explore/base_success_rate": 0.5, "explore/base_reward_mean": 0.625,
     "explore/valid_reflection_rate": 0.75, "explore/retries": 4, "explore/retry_improvement_rate": 0.5,
     "explore/retry_trigger_rate": 0.5, "explore/tokens_base": 1000, "explore/tokens_reflection": 500,
     "explore/optimizer_steps": 2, "explore/time_explore_s": 10.0},
    {"step": 2, "time/train_s": 5.0},
    {"step": 2, "explore/epoch": 1, "explore/base_success_rate": 0.25, "explore/base_reward_mean": 0.25,
     "explore/valid_reflection_rate": 1.0, "explore/retries": 0, "explore/retry_improvement_rate": 0.0,
     "explore/retry_trigger_rate": 0.0, "explore/tokens_base": 1200, "explore/tokens_reflection": 700,
     "explore/optimizer_steps": 2, "explore/time_explore_s": 12.0},
    {"step": 4, "time/train_s": 6.0},
    {"step": 4, "eval/epoch": 2, "eval/success_rate": 0.5, "eval/reward": 0.625},
]


def write_metrics(path, rows):
    keys = sorted({k for row in rows for k in row})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def run_dir(tmp_path):
    log_dir = tmp_path / "runs" / "job" / "csv" / "version_0"
    log_dir.mkdir(parents=True)
    write_metrics(log_dir / "metrics.csv", ROWS)
    return tmp_path / "runs" / "job"


def test_curves_per_epoch_and_key_figures(run_dir):
    curves = read_curves(find_metrics(run_dir))
    assert curves.series["eval_success"] == [(0, 0.25), (2, 0.5)]
    assert curves.series["base_success"] == [(0, 0.5), (1, 0.25)]
    assert curves.series["valid_reflection"] == [(0, 0.75), (1, 1.0)]
    assert curves.series["retry_improvement"] == [(0, 0.5)]  # epoch 1 had no retry: no rate, not 0
    text = key_figures(curves)
    assert "eval success: 0.250 before training → 0.500 after 2 epochs (best 0.500 after 2)" in text
    assert "eval reward:  0.400 → 0.625" in text
    table = text.splitlines()[3:7]
    assert [row.split() for row in table] == [
        ["epoch", "base", "success", "base", "reward", "valid", "reflections", "retry", "improved", "eval", "success"],
        ["0", "0.500", "0.625", "0.750", "0.500", "0.250"],
        ["1", "0.250", "0.250", "1.000", "–", "–"],
        ["2", "–", "–", "–", "–", "0.500"],
    ]
    assert "tokens generated: base 2,200, reflection 1,200" in text  # 1000 + 1200, 500 + 700
    assert text.endswith("optimizer steps 4 · exploration 22 s · training 11 s")  # 2 + 2; 10 + 12; 5 + 6


def test_epochs_come_from_the_steps_when_the_csv_predates_the_epoch_columns(tmp_path):
    rows = [{k: v for k, v in row.items() if not k.endswith("/epoch")} for row in ROWS]
    curves = read_curves(write_metrics(tmp_path / "metrics.csv", rows))
    # explore rows in order → epochs 0, 1; an evaluation follows the explorations that started before its step
    assert curves.series["base_success"] == [(0, 0.5), (1, 0.25)]
    assert curves.series["eval_success"] == [(0, 0.25), (2, 0.5)]


def test_report_command_prints_figures_and_writes_a_small_png(run_dir, capsys):
    run_tool(["report", str(run_dir)])
    out = capsys.readouterr().out
    png = run_dir / "csv" / "version_0" / "curves.png"
    assert out.rstrip().endswith(f"curves: {png}")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) < 200_000


def test_report_without_metrics_names_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_tool(["report", str(tmp_path)])
    assert exc.value.code == 2
    assert "no metrics.csv under" in capsys.readouterr().err
