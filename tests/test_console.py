"""The console without a terminal: plain progress lines, and the model summary without FLOPs."""

from __future__ import annotations

import time

import pytest
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

from r3l_lightning.cli import R3LTrainer
from r3l_lightning.console import ParameterSummary, PhaseProgress


def test_plain_progress_lines_every_interval_without_a_terminal(capsys):
    progress = PhaseProgress("epoch 0", trainer=None, log_every_s=0.05)  # capsys: stdout is not a terminal
    progress(4, "base")
    out = ""
    deadline = time.monotonic() + 10
    while "epoch 0 rollouts: 4 seq" not in out and time.monotonic() < deadline:  # written while no call returns
        time.sleep(0.05)
        out += capsys.readouterr().out
    progress(2, "base")
    progress(3, "reflection")  # a new phase closes the last one with its total
    progress.close()
    out += capsys.readouterr().out
    assert "epoch 0 rollouts: 4 seq, " in out
    assert "epoch 0 rollouts: 6 seq, " in out and out.count("(done)") <= 2
    assert [line for line in out.splitlines() if "rollouts" in line][-1].endswith("(done)")
    assert "━" not in out and "\r" not in out  # no bar drawn into the log


def test_progress_interval_must_be_positive():
    with pytest.raises(ValueError, match="log_every_s"):
        PhaseProgress("eval", log_every_s=0)


def test_default_model_summary_has_no_flops(capsys):
    trainer = R3LTrainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=1)
    summaries = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in summaries] == [ParameterSummary]
    kept = R3LTrainer(accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[RichModelSummary(2)])
    assert [type(c) for c in kept.callbacks if isinstance(c, ModelSummary)] == [ParameterSummary]
    ParameterSummary.summarize([(" ", ["0"]), ("Name", ["policy"]), ("Type", ["Llama"]), ("Params", ["6.6 M"]),
                                ("Mode", ["train"]), ("FLOPs", ["0"])], 6_600_000, 6_000_000, 26.4,
                               {"train": 33, "eval": 1}, total_flops=0)
    out = capsys.readouterr().out
    assert out.splitlines() == ["  | Name   | Type  | Params | Mode",
                                "0 | policy | Llama | 6.6 M  | train",
                                "params: 6.0 M trainable, 600 K frozen, 6.6 M total (26.4 MB); modules: 33 in train "
                                "mode, 1 in eval mode"]
