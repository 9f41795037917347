"""VLLMEngine checks (tests/vllm_engine_checks.py, tests/vllm_lora_checks.py, tests/vllm_reload_checks.py), run in
their own pytest process (see isolated.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isolated import assert_checks_pass

pytest.importorskip("vllm")


def test_vllm_engine_checks_pass_in_a_separate_process():
    assert_checks_pass(Path(__file__).with_name("vllm_engine_checks.py"))


def test_vllm_lora_checks_pass_in_a_separate_process():
    pytest.importorskip("peft")
    assert_checks_pass(Path(__file__).with_name("vllm_lora_checks.py"))


def test_r3l_fit_with_the_vllm_engine_runs_two_epochs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([
        sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(root / "configs" / "smoke" / "tiny.yaml"),
        "--model.engine", "r3l_lightning.engines.vllm.VLLMEngine", "--model.engine.init_args.enforce_eager", "true",
        "--model.engine.init_args.kv_cache_gib", "0.25", "--model.engine.init_args.max_model_len", "1024",
        "--trainer.max_epochs", "2",
    ], cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, VLLM_LOGGING_CONFIG_PATH=""))  # vLLM's own logging: r3l's quiet one drops its INFO
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "`max_epochs=2` reached" in output and "[eval after training] success_rate=" in output
    rows = list(csv.DictReader(open(next(tmp_path.glob("runs/smoke/csv/version_*/metrics.csv")))))
    steps = [row for row in rows if row.get("train/loss")]
    assert len(steps) >= 2  # optimizer steps in both epochs
    # completed in-place weight reloads: creation (eval before training); none at epoch 0's start (no optimizer
    # step since); one before the evaluation after epoch 0 (its steps); none at epoch 1's start again
    explored = [row for row in rows if row.get("explore/engine_weight_syncs")]
    assert [float(row["explore/engine_weight_syncs"]) for row in explored] == [1.0, 2.0]
    assert [float(row["explore/engine_syncs_skipped"]) for row in explored] == [1.0, 2.0]
    assert [float(row["explore/engine_starts"]) for row in explored] == [1.0, 1.0]


@pytest.mark.slow  # ~5 min: seven engine start-ups, one of them vLLM's first import
def test_vllm_reload_checks_pass_in_a_separate_process():
    pytest.importorskip("peft")
    assert_checks_pass(Path(__file__).with_name("vllm_reload_checks.py"))
