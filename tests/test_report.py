"""``r3l report``: key figures and curves.png from a run's CSV metrics."""

from __future__ import annotations

import csv

import pytest

from r3l_lightning.command import run_tool
from r3l_lightning.report import X_LABELS, curves_figure, find_metrics, key_figures, read_curves

# Lightning's CSVLogger: one row per log_metrics call, the union of all keys as columns, empty cells elsewhere.
# Two epochs of 2 optimizer steps each; evaluation before training and after 2 epochs. Epoch 0: 4 reflections,
# 3 valid, 1 informative (2 copy the prompt), 4 retries, 2 improved, 1 repeats the base at the pivot; its first
# step had no signal. Epoch 1: no retry, every group without reward spread, both steps without signal.
EPOCH_0 = {"explore/base_success_rate": 0.5, "explore/base_reward_mean": 0.625, "explore/valid_reflection_rate": 0.75,
           "explore/reflections": 4, "explore/valid_reflections": 3, "explore/informative_reflections": 1,
           "explore/informative_reflection_rate": 0.25, "explore/uninformative_reflection_copies_prompt": 2,
           "explore/retries": 4, "explore/retries_improved": 2, "explore/retry_improvement_rate": 0.5,
           "explore/retry_same_as_base_rate": 0.25, "explore/retry_trigger_rate": 0.5,
           "explore/frac_reward_zero_std": 0.5, "explore/frac_nonzero_advantage": 0.375,
           "explore/samples_sft_reflect": 1, "explore/samples_sft_retry": 1, "explore/tokens_base": 1000,
           "explore/tokens_reflection": 500, "explore/optimizer_steps": 2, "explore/time_explore_s": 10.0}
EPOCH_1 = {"explore/base_success_rate": 0.25, "explore/base_reward_mean": 0.25, "explore/valid_reflection_rate": 1.0,
           "explore/reflections": 4, "explore/valid_reflections": 4, "explore/informative_reflections": 2,
           "explore/informative_reflection_rate": 0.5, "explore/uninformative_reflection_copies_prompt": 2,
           "explore/retries": 0, "explore/retries_improved": 0, "explore/retry_improvement_rate": 0.0,
           "explore/retry_same_as_base_rate": 0.0, "explore/retry_trigger_rate": 0.0,
           "explore/frac_reward_zero_std": 1.0, "explore/frac_nonzero_advantage": 0.0,
           "explore/samples_sft_reflect": 0, "explore/samples_sft_retry": 0, "explore/tokens_base": 1200,
           "explore/tokens_reflection": 700, "explore/optimizer_steps": 2, "explore/time_explore_s": 12.0}


def step_row(step, loss, no_signal, grad_norm):
    return {"step": step, "train/loss": loss, "train/rl_loss": loss, "train/sft_loss": 0.0, "train/grad_norm": grad_norm,
            "train/entropy": 1.5, "train/advantage_mean": 0.0, "train/advantage_min": -1.0 + no_signal,
            "train/advantage_max": 1.0 - no_signal, "train/no_signal_step": no_signal}


ROWS = [
    {"step": 0, "eval/epoch": 0, "eval/success_rate": 0.25, "eval/reward": 0.4},
    {"step": 0, "explore/epoch": 0, **EPOCH_0},
    step_row(1, 0.0, 1, 0.0), step_row(2, 0.3, 0, 2.5),
    {"step": 2, "time/train_s": 5.0},
    {"step": 2, "explore/epoch": 1, **EPOCH_1},
    step_row(3, 0.0, 1, 0.0), step_row(4, 0.0, 1, 0.0),
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
    assert curves.series["informative_reflection"] == [(0, 0.25), (1, 0.5)]
    assert curves.series["retry_improvement"] == [(0, 0.5)]  # epoch 1 had no retry: no rate, not 0
    assert curves.series["retry_same_as_base"] == [(0, 0.25)]
    assert curves.series["zero_spread_groups"] == [(0, 0.5), (1, 1.0)]
    assert curves.step_series["grad_norm"] == [(1, 0.0), (2, 2.5), (3, 0.0), (4, 0.0)]
    assert (curves.no_signal_steps(0), curves.no_signal_steps(1), curves.no_signal_steps()) == (1, 2, 3)
    text = key_figures(curves)
    assert "eval success: 0.250 before training → 0.500 after 2 epochs (best 0.500 after 2)" in text
    assert "eval reward:  0.400 → 0.625" in text
    table = [line.split("  ") for line in text.splitlines()[3:7]]
    assert [[cell.strip() for cell in row if cell.strip()] for row in table] == [
        ["epoch", "base success", "valid refl", "informative", "retry improved", "retry = base", "zero-spread groups",
         "nonzero adv", "no-signal steps", "eval success"],
        ["0", "0.500", "0.750", "0.250", "0.500", "0.250", "0.500", "0.375", "1/2", "0.250"],
        ["1", "0.250", "1.000", "0.500", "–", "–", "1.000", "0.000", "2/2", "–"],
        ["2", "–", "–", "–", "–", "–", "–", "–", "–", "0.500"],
    ]
    # summed over the epochs: 3 + 4 valid, 1 + 2 informative of 8; 4 retries, 2 improved, 0.25 · 4 same as base
    assert "reflections 8: valid 7, informative 3 (38%); uninformative: copies_prompt 4" in text
    assert "retries 4: improved 2 (50%), same as base 1" in text
    assert "sft samples 2 (sft_reflect 1, sft_retry 1)" in text
    assert "tokens generated: base 2,200, reflection 1,200" in text  # 1000 + 1200, 500 + 700
    assert text.endswith("optimizer steps 4 (3 without signal) · exploration 22 s · training 11 s")


def test_x_axes_map_epochs_to_steps_and_rollout_tokens(run_dir):
    curves = read_curves(find_metrics(run_dir))
    # epoch 0 starts at step 0 with 0 tokens, epoch 1 at step 2 after 1000 + 500, the run ends at step 4 after 3400
    assert [curves.to_x(e, "step") for e in (0, 1, 2)] == [0, 2, 4]
    assert [curves.to_x(e, "tokens") for e in (0, 1, 2)] == [0, 1500, 3400]
    assert curves.step_to_epoch(3) == 1.5  # the first of epoch 1's two steps
    assert curves.to_x(curves.step_to_epoch(3), "tokens") == 1500 + 1900 / 2


@pytest.mark.parametrize("x", ["epoch", "step", "tokens"])
def test_curves_png_has_every_panel_with_labelled_axes(run_dir, x):
    figure = curves_figure(read_curves(find_metrics(run_dir)), x)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["evaluation", "base rollouts", "reflections", "retries", "training signal",
                                               "loss", "gradient norm", "entropy", "advantages", "rollout tokens"]
    for ax in axes:
        assert ax.get_ylabel() and ax.get_xlabel() == X_LABELS[x], ax.get_title()
        assert not [t for t in ax.texts if "not logged" in t.get_text()], ax.get_title()  # every panel has data
    assert figure.get_size_inches().tolist() == [16, 9] and figure.dpi == 100  # 1600 × 900 px
    labels = lambda ax: [line.get_label() for line in ax.get_lines()]  # noqa: E731
    assert labels(axes[3]) == ["improved R' > R", "triggered (of bases)", "same as base at pivot"]
    assert "no-signal step (loss 0)" in labels(axes[5])
    assert [p.get_height() for p in axes[9].patches] == [1000, 1200, 500, 700]  # base, then reflection, per epoch
    if x == "tokens":
        assert [line.get_xdata().tolist() for line in axes[6].get_lines()] == [[750, 1500, 2450, 3400]]


def test_a_success_rate_equal_to_the_reward_is_one_line_named_for_both(tmp_path):
    rows = [dict(row, **{"eval/reward": row["eval/success_rate"]}) if "eval/reward" in row else row for row in ROWS]
    figure = curves_figure(read_curves(write_metrics(tmp_path / "metrics.csv", rows)))
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["success rate = reward"]


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
    assert data.startswith(b"\x89PNG") and len(data) < 400_000  # 1600 × 900 px


def test_report_without_metrics_names_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_tool(["report", str(tmp_path)])
    assert exc.value.code == 2
    assert "no metrics.csv under" in capsys.readouterr().err
