"""Two CPU processes (gloo): DDP, FSDP1 (FSDPStrategy) and FSDP2 (ModelParallelStrategy) never deadlock on uneven ranks,
and train to the same weights as one process on the same data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r3l_lightning.models import TINY_RANDOM, load_policy

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke" / "tiny.yaml"
FSDP2 = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"]
FSDP1 = ["--trainer.strategy", "{class_path: scripted.CPUFSDPStrategy}"]  # decoder layers auto-wrapped by R3LModule
TIMEOUT_S = 420  # a deadlock fails the test instead of hanging CI


def fit_command(*args: str, launcher: Sequence[str] = (sys.executable, "-m")) -> list[str]:
    """``r3l fit`` on the smoke config with ``args``; ``launcher`` runs the module (plain python, or torchrun)."""
    return [*launcher, "r3l_lightning.cli", "fit", "--config", str(SMOKE), *args]


def fit_env() -> dict[str, str]:
    """The environment of a test run: this checkout's package and the test doubles importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))


def fit(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(fit_command(*args), cwd=tmp, env=fit_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_ddp_with_uneven_ranks_finishes_with_identical_weights(tmp_path):
    fit(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--data.explorer", "scripted.UnevenExplorer", "--data.explorer.init_args.group_size", "2",
        "--trainer.callbacks+=scripted.DumpWeights", f"--trainer.callbacks.dirpath={tmp_path}")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    initial = load_policy(TINY_RANDOM).state_dict()
    assert max((rank0[k] - rank1[k]).abs().max().item() for k in rank0) == 0.0
    assert max((rank0[k] - initial[k]).abs().max().item() for k in rank0) > 0.0  # it trained
    # rank 1 sent its group to rank 0, which wrote the epoch's one rollout file: rank r's task has 2 + 2·r attempts
    (rollouts,) = tmp_path.glob("runs/smoke/csv/version_*/rollouts/epoch_0.jsonl")
    assert sorted(len(json.loads(line)["attempts"]) for line in rollouts.read_text().splitlines()) == [2, 4]


def _fixed_data_args(tmp: Path) -> list[str]:
    """Model-independent data (``FixedExplorer``), one optimizer step per epoch (2 epochs), exported to ``tmp/hf``."""
    return ["--data.explorer", "scripted.FixedExplorer", "--data.tasks_per_epoch", "2",
            "--data.groups_per_step", "2", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback},"
            f" {{class_path: r3l_lightning.callbacks.HFExportCallback, init_args: {{dirpath: {tmp}/hf}}}}]"]


def _fixed_data_run(tmp: Path, *extra: str) -> dict[str, torch.Tensor]:
    fit(tmp, *_fixed_data_args(tmp), *extra)
    return load_file(tmp / "hf" / "model.safetensors")


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """``got`` equals ``expected`` (to float reduction order), and ``expected`` trained away from the initial model."""
    initial = load_policy(TINY_RANDOM).state_dict()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-5  # it trained


@pytest.mark.parametrize("strategy", [FSDP2, FSDP1], ids=["fsdp2", "fsdp1"])
def test_sharded_run_matches_a_single_process_run_on_the_same_data(tmp_path, strategy):
    (tmp_path / "single").mkdir()
    (tmp_path / "fsdp").mkdir()
    single = _fixed_data_run(tmp_path / "single")
    sharded = _fixed_data_run(tmp_path / "fsdp", "--trainer.devices", "2", *strategy)
    _assert_same_weights(sharded, single)


def torchrun(node_rank: int, port: int) -> list[str]:
    """The cluster launch line of configs/gpu/*.yaml and docs/distributed.md for one node of 2 (one process each),
    with 127.0.0.1 as the master: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank N ... -m <module>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three smoke-model runs, two of them torchrun nodes: 12 min on 2 busy cores (load 10)
def test_two_nodes_launched_by_torchrun_on_loopback_match_a_single_process_run(tmp_path):
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = _fixed_data_run(single_dir)
    port = _free_port()
    env = dict(fit_env(), GLOO_SOCKET_IFNAME="lo")  # the "nodes" talk over loopback
    nodes, logs, procs = [tmp_path / f"node{r}" for r in (0, 1)], [], []
    for rank, node in enumerate(nodes):  # each node has its own directory, as if on its own machine
        node.mkdir()
        logs.append(open(node / "log.txt", "w"))  # a file, not a pipe: a full pipe would stall its node
        procs.append(subprocess.Popen(
            fit_command(*_fixed_data_args(node), "--trainer.num_nodes", "2", "--trainer.devices", "1",
                        "--trainer.strategy", "ddp", launcher=torchrun(rank, port)),
            cwd=node, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            log.close()
    for node, code in zip(nodes, codes):
        assert code == 0, (node / "log.txt").read_text()[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (nodes[1] / "log.txt").read_text()  # Lightning saw 2 nodes
    _assert_same_weights(load_file(nodes[0] / "hf" / "model.safetensors"), single)
    assert not (nodes[1] / "hf").exists()  # only global rank 0 exports


@pytest.mark.slow  # two processes' start-up: 1-2 min on a quiet machine, 7 min with the CPUs shared
@pytest.mark.parametrize("strategy", [FSDP2, FSDP1], ids=["fsdp2", "fsdp1"])
def test_named_full_weights_of_a_sharded_policy_equal_the_single_process_state_dict(tmp_path, strategy):
    """What a weight sync streams into vLLM: every rank gathers the same full tensors, in the same order."""
    fit(tmp_path, "--trainer.devices", "2", *strategy, "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", f"[{{class_path: scripted.DumpFullWeights, init_args: {{dirpath: {tmp_path}}}}}]")
    expected = load_policy(TINY_RANDOM).state_dict()
    assert expected["lm_head.weight"].data_ptr() == expected["model.embed_tokens.weight"].data_ptr()
    del expected["lm_head.weight"]  # tied: yielded once, under the embedding's name
    rank0, rank1 = (torch.load(tmp_path / f"full_rank{rank}.pt") for rank in (0, 1))
    assert [name for name, _ in rank0] == [name for name, _ in rank1]
    for weights in (rank0, rank1):
        assert sorted(name for name, _ in weights) == sorted(expected)
        for name, tensor in weights:
            assert torch.equal(tensor, expected[name]), name


def _exported(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = max(run_dir.glob("runs/smoke/**/hf_model/model.safetensors"), key=lambda p: p.stat().st_mtime)
    return load_file(latest)


@pytest.mark.slow  # ~2 min of two processes; FSDP1 training itself stays in the default suite
def test_fsdp1_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    resumed.mkdir()
    sharded = ["--trainer.devices", "2", *FSDP1, "--data.explorer", "scripted.FixedExplorer",
               "--data.tasks_per_epoch", "2", "--data.groups_per_step", "2"]  # model-independent data that trains
    fit(straight, *sharded, "--trainer.max_epochs", "2")
    fit(resumed, *sharded, "--trainer.max_epochs", "1")
    after_one_epoch = _exported(resumed)
    proc = fit(resumed, *sharded, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    expected, got = _exported(straight), _exported(resumed)
    assert set(expected) == set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert max((got[k] - after_one_epoch[k]).abs().max().item() for k in got) > 1e-6  # epoch 2 trained after resuming
