"""Preemption: SIGTERM during exploration, evaluation or training stops a real ``r3l fit`` within the grace period,
with exit code 143 and a checkpoint from which ``--ckpt_path last`` ends exactly like an uninterrupted run (the same
final weights, bit for bit; the reward is learnable, so the weights do change); a configured SIGUSR1 does the
same with code 138."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file

from r3l_lightning.callbacks.preemption import SigtermCheckpoint, preemption_requested, raise_if_preempted

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "tiny.yaml"
# two epochs of two steps, each step of several micro-batches; the engine signals itself at a chosen call
ARGS = ["--model.engine", "scripted.SignallingEngine", "--data.environment", "scripted.TokenDirectionEnv",
        "--data.max_tokens_per_micro_batch", "128",
        "--data.explorer.init_args.group_size", "4", "--data.explorer.init_args.max_new_tokens", "12",
        "--data.explorer.init_args.reflection_max_new_tokens", "12", "--trainer.callbacks+=scripted.SignalBeforeBackward"]
GRACE_S = 30  # SLURM's and Kubernetes' shortest usual grace period


def fit(cwd: Path, *extra: str, signal_at: str | None = None, kind: str = "TERM") -> tuple[subprocess.CompletedProcess, float]:
    """An ``r3l fit`` subprocess in ``cwd``; with ``signal_at`` (``phase:count``, see ``scripted.signal_at``) it
    signals itself there. Returns the process and the seconds from the signal to its exit (0 without one)."""
    stamp = cwd / "signal_sent"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))  # this checkout first
    if signal_at is not None:
        env.update(R3L_TEST_SIGNAL_AT=signal_at, R3L_TEST_SIGNAL=kind, R3L_TEST_SIGNAL_STAMP=str(stamp))
    proc = subprocess.run([sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(SMOKE), *ARGS, *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    return proc, (ended - float(stamp.read_text())) if signal_at is not None else 0.0


def seconds_to_checkpoint(run: Path) -> float:
    """Seconds from the signal to ``last.ckpt`` on disk: what must fit the grace period (a SIGKILL after it loses
    nothing). The process exit follows with the interpreter's teardown, slower on a loaded machine."""
    return (run / "runs/smoke/checkpoints/last.ckpt").stat().st_mtime - float((run / "signal_sent").read_text())


def final_weights(run: Path, version: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"runs/smoke/csv/version_{version}/hf_model/model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("uninterrupted")
    proc, _ = fit(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(run, 0)


def preempt_then_resume(run: Path, signal_at: str, kind: str = "TERM", *extra: str) -> dict:
    """Signal a fit at ``signal_at``, check the stop (exit code, time, checkpoint), resume it; the checkpoint."""
    stopped, exit_s = fit(run, *extra, signal_at=signal_at, kind=kind)
    assert stopped.returncode == 128 + getattr(signal, "SIG" + kind), stopped.stderr[-3000:]
    assert seconds_to_checkpoint(run) < GRACE_S, f"checkpoint {seconds_to_checkpoint(run):.1f} s after the signal"
    print(f"{signal_at}: checkpoint {seconds_to_checkpoint(run):.1f} s, exit {exit_s:.1f} s after the signal")
    assert f"SIG{kind}: checkpoint saved" in stopped.stderr + stopped.stdout
    assert not (run / "runs/smoke/csv/version_0/hf_model").exists()  # it stopped before the end
    last = run / "runs/smoke/checkpoints/last.ckpt"
    assert not last.is_symlink()  # its own file, not written through the link to an epoch's checkpoint
    checkpoint = torch.load(last, weights_only=False)
    resumed, _ = fit(run, "--ckpt_path", "last", *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return checkpoint


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_sigterm_during_exploration_stops_at_the_next_step_and_resume_redoes_it(tmp_path, uninterrupted):
    # the signal arrives during epoch 1's exploration (its first generate call: explore call 4 of the run)
    checkpoint = preempt_then_resume(tmp_path, "explore:4")
    assert checkpoint["global_step"] == 2  # epoch 0's two steps; none of epoch 1
    assert checkpoint["ExperienceDataModule"]["task_cursor"] == 2  # epoch 1's draw undone: redone on resume
    assert checkpoint["ExperienceDataModule"]["untrained_steps"] == []
    assert_same_weights(final_weights(tmp_path, 1), uninterrupted)


@pytest.mark.slow  # ~45 s each on 2 idle cores
@pytest.mark.parametrize("signal_at, step, untrained", [
    ("eval:2", 0, 0),  # the evaluation before training (2 turns: its second generate call)
    ("backward:2", 1, 1),  # the second step, between its micro-batches (the first has one): it stays untrained
])
def test_sigterm_in_evaluation_or_training_stops_the_run_and_resume_ends_like_an_uninterrupted_run(
        tmp_path, uninterrupted, signal_at, step, untrained):
    checkpoint = preempt_then_resume(tmp_path, signal_at)
    assert checkpoint["global_step"] == step
    assert len(checkpoint["ExperienceDataModule"]["untrained_steps"]) == untrained
    assert_same_weights(final_weights(tmp_path, 1), uninterrupted)


class _Trainer:
    """What ``SigtermCheckpoint`` reads of a trainer."""

    def __init__(self, environment, callbacks=()) -> None:
        self._accelerator_connector = type("Connector", (), {"cluster_environment": environment})()
        self.callbacks = list(callbacks)
        self.received_sigterm = False
        self.global_step = 7
        self.saved: list[Path] = []

    def save_checkpoint(self, path) -> None:
        self.saved.append(Path(path))


def test_a_configured_sigusr1_requests_the_stop_and_sets_exit_code_138(tmp_path):
    callback = SigtermCheckpoint(dirpath=str(tmp_path), signals=["SIGTERM", "SIGUSR1"])
    trainer = _Trainer(LightningEnvironment(), [callback])
    callback.setup(trainer, None, "fit")
    try:
        raise_if_preempted(trainer)  # nothing received yet: no stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption_requested(trainer)
        with pytest.raises(SIGTERMException) as raised:
            raise_if_preempted(trainer)
    finally:
        callback.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the previous handler is back
    callback.on_exception(trainer, None, raised.value)
    assert trainer.saved == [tmp_path / "last.ckpt"]
    assert raised.value.code == 138


def test_under_slurm_auto_requeue_its_requeue_signal_is_left_to_lightning(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    callback = SigtermCheckpoint(dirpath=str(tmp_path), signals=["SIGTERM", "SIGUSR1"])
    callback.setup(_Trainer(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)), None, "fit")
    try:
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # Lightning registers its requeue handler there
        assert signal.getsignal(signal.SIGTERM) == callback._record_signal
    finally:
        callback.teardown(None, None, "fit")


def test_an_unknown_signal_name_is_refused_by_name():
    with pytest.raises(ValueError, match=r"SigtermCheckpoint.signals: unknown signal name\(s\) \['SIGFOO'\]"):
        SigtermCheckpoint(signals=["SIGTERM", "SIGFOO"])
