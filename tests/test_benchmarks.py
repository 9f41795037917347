"""One fast run per speed benchmark on the tiny model, so the scripts do not rot: each prints its table and
its last line (the figures themselves come from the full runs, see benchmarks/README.md)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from test_cli import ROOT

TINY = ["--model", "tiny-random-smollm2", "--steps", "1"]


def run(script: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_train_step_prints_rows_and_mfu():
    lines = run("train_step.py", *TINY, "--sequences", "4", "--min-len", "16", "--max-len", "64",
                "--micro-batch-tokens", "128", "--rows", "fp32,fp32-full-logits")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("fp32", "fp32-full-logits")}
    assert set(rows) == {"fp32", "fp32-full-logits"}
    for row in rows.values():
        micro_batches, forwards = int(row[4]), int(row[5])
        # lengths 16, 32, 48, 64 shortest first within 128 padded tokens: [16, 32] (2 × 32) and [48, 64] (2 × 64)
        assert micro_batches == 2
        assert forwards == micro_batches  # R³L: one policy forward per micro-batch, no reference, no old logprobs
    assert re.fullmatch(r"train_mfu=\d+\.\d{3}", lines[-1])


def test_vs_trl_prints_rows_and_speed_ratio():
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e '.[bench]' (scripts/install.sh does)")
    lines = run("vs_trl.py", *TINY, "--prompts", "1", "--group", "2", "--tokens", "8", "--rows", "trl-hf,ours-hf")
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("trl-hf", "ours-hf")}
    assert set(rows) == {"trl-hf", "ours-hf"}
    for row in rows.values():
        seconds, generate, rest = map(float, row[1:4])
        assert seconds > 0 and generate > 0 and abs(generate + rest - seconds) < 0.02
    assert re.fullmatch(r"ours_over_trl_step_speed=\d+\.\d\d \(ours-hf vs trl-hf\)", lines[-1])
