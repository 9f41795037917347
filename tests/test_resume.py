"""Checkpoints: a run killed during epoch 3's rollouts and resumed from ``last`` ends exactly like an
uninterrupted run (SIGTERM and SIGUSR1: tests/test_preemption.py)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "tiny.yaml"
ARGS = ["--trainer.max_epochs", "3", "--data.explorer", "scripted.SignallingExplorer",
        "--data.explorer.init_args.group_size", "4", "--data.explorer.init_args.max_new_tokens", "12",
        "--data.explorer.init_args.reflection_max_new_tokens", "12"]


def fit(cwd: Path, *extra: str, signal_on_call: int | None = None, kind: str = "KILL") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))  # this checkout first
    if signal_on_call is not None:
        env.update(R3L_TEST_SIGNAL_ON_CALL=str(signal_on_call), R3L_TEST_SIGNAL=kind)
    return subprocess.run([sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(SMOKE), *ARGS, *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def rows(run_dir: Path, version: int) -> list[dict]:
    return list(csv.DictReader((run_dir / "csv" / f"version_{version}" / "metrics.csv").open()))


def epoch3_metrics(rows_: list[dict], epoch3_start: int) -> dict[tuple[int, str], str]:
    """Exploration statistics logged at epoch 3's start and training metrics of its steps (timings excluded)."""
    out = {}
    for r in rows_:
        step = int(r["step"])
        for key, value in r.items():
            if not value or key.endswith("_s"):
                continue
            if (key.startswith("explore/") and step >= epoch3_start) or (key.startswith("train/") and step > epoch3_start):
                out[(step, key)] = value
    return out


@pytest.mark.slow  # ~3 min; the default suite keeps exact resume through test_lora's resume test and test_preemption
def test_kill_during_epoch_3_rollouts_then_resume_equals_uninterrupted(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    assert fit(straight).returncode == 0
    killed = fit(crashed, signal_on_call=3)
    assert killed.returncode == -signal.SIGKILL  # died inside epoch 3's exploration
    epoch3_start = int(torch.load(crashed / "runs/smoke/checkpoints/last.ckpt", weights_only=False)["global_step"])
    assert epoch3_start == 4  # the checkpoint of epoch 2's end: two epochs of two steps
    resumed = fit(crashed, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final_straight = load_file(next(straight.glob("runs/smoke/csv/version_0/hf_model/model.safetensors")))
    final_resumed = load_file(next(crashed.glob("runs/smoke/csv/version_1/hf_model/model.safetensors")))
    for key in final_straight:
        torch.testing.assert_close(final_resumed[key], final_straight[key], rtol=0, atol=0, msg=key)
    expected = epoch3_metrics(rows(straight / "runs/smoke", 0), epoch3_start)
    got = epoch3_metrics(rows(crashed / "runs/smoke", 1), epoch3_start)
    assert (epoch3_start + 1, "train/loss") in expected and (epoch3_start, "explore/tokens_base") in expected
    assert got == expected

