"""``precision: auto`` / ``model_dtype: auto``: bf16-mixed on CPUs with native bf16 (AMX or AVX512-BF16) and on
CUDA GPUs with native bf16, fp32 elsewhere, decided from faked CPU flags and a faked CUDA capability; and the
``r3l`` command resolving both before it builds the model and the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import r3l_lightning.precision as precision
from r3l_lightning.cli import R3LTrainer, cli_main

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke" / "tiny.yaml"
# the flags lines of real /proc/cpuinfo files, shortened
AMX_XEON = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
AVX512_BF16_EPYC = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16"
AVX2_ONLY = "fpu sse2 avx avx2 fma"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """``machine(flags, cuda)``: this process sees a CPU with ``flags`` and CUDA device 0 of capability ``cuda``."""

    def fake(flags: str, cuda: tuple[int, int] | None = None) -> None:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("".join(f"processor\t: {i}\nmodel name\t: Some CPU avx512_bf16\nflags\t\t: {flags}\n\n"
                                   for i in range(2)))
        monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
        monkeypatch.setattr(precision, "cuda_capability", lambda: cuda)

    return fake


@pytest.mark.parametrize("flags, expected, reason", [
    (AMX_XEON, "bf16-mixed", "this CPU has native bf16: AMX, AVX512-BF16"),
    (AVX512_BF16_EPYC, "bf16-mixed", "this CPU has native bf16: AVX512-BF16"),
    (AVX2_ONLY, "32-true", "this CPU has no native bf16"),
], ids=["amx", "avx512-bf16", "avx2-only"])
def test_cpu_choice_follows_the_bf16_flags(machine, flags, expected, reason):
    machine(flags)
    for accelerator in ("auto", "cpu"):
        choice = precision.auto_precision(accelerator)
        assert choice.precision == expected and choice.reason.startswith(reason), (accelerator, choice)


def test_model_name_words_are_not_flags(machine):
    machine(AVX2_ONLY)  # "avx512_bf16" appears in the fake model name line only
    assert precision.cpu_flags() == set(AVX2_ONLY.split())
    assert not precision.cpu_has_native_bf16()


@pytest.mark.parametrize("accelerator, cuda, expected, reason", [
    ("auto", (9, 0), "bf16-mixed", "CUDA capability 9.0 has native bf16"),
    ("gpu", (8, 0), "bf16-mixed", "CUDA capability 8.0 has native bf16"),
    ("cuda", (7, 0), "32-true", "CUDA capability 7.0 has no native bf16"),
    ("gpu", None, "32-true", "accelerator gpu without a CUDA device"),
    ("cpu", (9, 0), "32-true", "this CPU has no native bf16"),  # the trainer runs on the (AVX2) CPU
    ("mps", None, "32-true", "accelerator mps: bf16 not measured"),
], ids=["auto-h100", "gpu-a100", "cuda-v100", "gpu-missing", "cpu-beside-gpu", "mps"])
def test_gpu_choice_follows_the_cuda_capability(machine, accelerator, cuda, expected, reason):
    machine(AVX2_ONLY, cuda)
    choice = precision.auto_precision(accelerator)
    assert choice.precision == expected and choice.reason.startswith(reason), choice


def test_explicit_values_are_kept_and_model_dtype_follows_the_precision(machine):
    machine(AMX_XEON)
    assert precision.resolve_auto("32-true", "bfloat16") == ("32-true", "bfloat16", None)
    assert precision.resolve_auto("32-true", "auto") == (
        "32-true", "float32", "model_dtype: auto -> float32 (trainer.precision 32-true)")
    assert precision.resolve_auto("bf16-true", "auto")[1] == "bfloat16"
    assert precision.resolve_auto("auto", "float32") == (
        "bf16-mixed", "float32", "precision: auto -> bf16-mixed (this CPU has native bf16: AMX, AVX512-BF16)")


@pytest.mark.parametrize("flags, args, expected, line", [
    (AMX_XEON, [], "bf16-mixed", "precision: auto -> bf16-mixed, model_dtype: auto -> float32 (this CPU has "
                                 "native bf16: AMX, AVX512-BF16)"),
    (AVX2_ONLY, [], "32-true", "precision: auto -> 32-true, model_dtype: auto -> float32 (this CPU has no native bf16"),
    (AMX_XEON, ["--trainer.precision", "32-true"], "32-true", "model_dtype: auto -> float32 (trainer.precision 32-true)"),
], ids=["amx", "avx2-only", "amx-fp32-override"])
def test_fit_resolves_auto_before_building_model_and_trainer(machine, monkeypatch, capsys, tmp_path, flags, args,
                                                             expected, line):
    machine(flags)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(R3LTrainer, "fit", lambda self, **kwargs: None)  # built, not run
    cli = cli_main(["fit", "--config", str(SMOKE), "--trainer.precision", "auto", "--model.model_dtype", "auto",
                    *args])
    assert cli.trainer.precision == expected
    assert cli.model.policy.dtype == torch.float32 and cli.model.hparams.model_dtype == "float32"
    printed = [text for text in capsys.readouterr().out.splitlines() if "auto ->" in text]
    assert len(printed) == 1 and printed[0].startswith(line), printed


def test_trainer_resolves_auto_outside_the_cli(machine, capsys):
    machine(AVX512_BF16_EPYC)
    trainer = R3LTrainer(precision="auto", accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.precision == "bf16-mixed"
    assert "precision: auto -> bf16-mixed (this CPU has native bf16: AVX512-BF16)" in capsys.readouterr().out
