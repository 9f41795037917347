"""One fast run per speed benchmark on the tiny model, so the scripts do not rot: each prints its table and
its last line (the figures themselves come from the full runs, see benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import re
import shutil
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
                "--micro-batch-tokens", "128", "--rows", "fp32")
    (row,) = [line.split() for line in lines if line.startswith("fp32 ")]
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


@pytest.mark.skipif(shutil.which("java") is None or importlib.util.find_spec("scienceworld") is None,
                    reason="ScienceWorld needs Java and `pip install -e .[scienceworld]`")
def test_memory_prints_components_and_peak():
    # the ScienceWorld config (a JVM child process) with the tiny model and the HF engine, one small task
    lines = run("memory.py", "--configs", "configs/scienceworld/r3l.yaml",
                "--model.model_name_or_path", "tiny-random-smollm2", "--model.engine", "r3l_lightning.engines.hf.HFEngine",
                "--data.tasks_per_epoch", "1", "--data.groups_per_step", "1",
                "--data.explorer.init_args.group_size", "2", "--data.explorer.init_args.max_new_tokens", "8",
                "--data.explorer.init_args.reflection_max_new_tokens", "16")
    sampled = {m[0]: float(m[1]) for m in re.findall(r"^(trainer|environment) +(\d+\.\d\d) +\d+$", "\n".join(lines), re.M)}
    assert sampled["trainer"] > 0.1 and sampled["environment"] > 0.01  # python + torch alone is > 0.1 GB; one JVM
    phases = re.findall(r"^  (\w[\w ]*?) +trainer +\d+\.\d\d -> peak +\d+\.\d\d GB", "\n".join(lines), re.M)
    assert phases == ["loading", "fit start", "exploration", "training"]  # HFEngine: no engine creation phase
    libraries = re.search(r"^  libraries \(python, torch, transformers\) +\+(\d+\.\d\d) GB", "\n".join(lines), re.M)
    assert float(libraries.group(1)) > 0.1
    assert "environment: up to 2 JVMs, -Xmx384m" in "\n".join(lines)  # the config's max_jvms, the default options
    total = float(re.fullmatch(r"peak_rss_gb=(\d+\.\d\d)", lines[-1]).group(1))
    assert lines[-2] == f"scienceworld_peak_rss_gb={total:.2f}"
    assert total >= sampled["trainer"]  # the total is taken over the whole tree, at least at every sample
