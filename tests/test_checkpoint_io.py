"""AtomicCheckpointIO: a failed save leaves the previous checkpoint intact; ``r3l`` installs it."""

from __future__ import annotations

import csv
import errno
import os
import re
import stat

import pytest
import torch

import r3l_lightning.checkpoint_io as checkpoint_io
from r3l_lightning.checkpoint_io import AtomicCheckpointIO, atomic_write


def test_save_then_load_round_trips(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3, "w": torch.arange(4.0)}, tmp_path / "sub" / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "a.ckpt")
    assert loaded["step"] == 3 and loaded["w"].equal(torch.arange(4.0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.ckpt"]


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash_half_way(obj, f):
        f.write(b"partial bytes of a new checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_storage_options_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "a.ckpt", storage_options={"x": 1})


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_logs_get_the_umask_mode_not_owner_only(tmp_path, umask):
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        with atomic_write(tmp_path / "rollouts" / "epoch_0.jsonl", "w") as f:
            f.write("{}\n")
        (tmp_path / "plain.txt").write_text("x")  # what open() gives a new file under this umask
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask  # 0o644 (colleagues read it) for umask 022, 0o640 for 027
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == expected
    for path in (tmp_path / "last.ckpt", tmp_path / "rollouts" / "epoch_0.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def _disk_full_after_some_bytes(obj, f):
    f.write(b"the first bytes of a new checkpoint")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(checkpoint_io.torch, "save", _disk_full_after_some_bytes)
    with pytest.raises(OSError, match=r"last\.ckpt was not written: No space left on device .*previous checkpoint "
                                      r"there is intact.*dirpath") as raised:
        io.save_checkpoint({"step": 2}, path)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial temp file left to fill the disk


def test_a_full_disk_during_a_fit_keeps_the_earlier_checkpoint_and_the_logs(tmp_path, monkeypatch):
    """The second epoch's checkpoint hits a full disk: the run stops with the clear error; epoch 0's checkpoint
    and the metrics logged up to then stay."""
    from r3l_lightning.cli import cli_main
    from test_cli import SMOKE

    monkeypatch.chdir(tmp_path)
    real_save, saves = torch.save, []

    def save_then_fill_the_disk(obj, f):
        saves.append(obj["global_step"])
        if len(saves) <= 2:  # epoch 0's checkpoint and its copy as last.ckpt
            return real_save(obj, f)
        return _disk_full_after_some_bytes(obj, f)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left on device"):
        cli_main(["fit", "--config", str(SMOKE), "--data.explorer.init_args.group_size", "2",
                  "--data.explorer.init_args.max_new_tokens", "4", "--data.explorer.init_args.reflection_max_new_tokens",
                  "4", "--data.eval_tasks", "null", "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks."
                  "ExplorationCallback}, {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
                  "{dirpath: runs/smoke/checkpoints, save_last: true, save_top_k: -1}}]"])
    monkeypatch.undo()
    assert saves == [2, 2, 4]  # epoch 0's checkpoint (two steps) and last.ckpt were written; epoch 1's failed
    checkpoints = tmp_path / "runs/smoke/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    steps = [row["step"] for row in csv.DictReader((tmp_path / "runs/smoke/csv/version_0/metrics.csv").open())
             if row.get("train/loss")]
    assert steps == ["1", "2", "3", "4"]  # every step's metrics, those of the epoch whose checkpoint failed too


def test_a_truncated_last_checkpoint_names_the_file_and_the_previous_one(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.zeros(64)}, tmp_path / "epoch=0-step=2.ckpt")
    io.save_checkpoint({"step": 2, "w": torch.zeros(64)}, tmp_path / "epoch=1-step=4.ckpt")
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 3, "w": torch.zeros(64)}, last)
    last.write_bytes(last.read_bytes()[:200])  # a copy cut short
    with pytest.raises(RuntimeError, match=rf"checkpoint {re.escape(str(last))} is truncated or corrupt .*"
                                           rf"--ckpt_path {re.escape(str(tmp_path / 'epoch=1-step=4.ckpt'))}$"):
        io.load_checkpoint(last)


def test_a_truncated_link_target_is_named_and_no_other_checkpoint_is_said_so(tmp_path):
    target = tmp_path / "epoch=0-step=2.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    target.write_bytes(target.read_bytes()[:10])
    (tmp_path / "last.ckpt").symlink_to(target.name)  # Lightning's save_last: link
    with pytest.raises(RuntimeError, match=r"last\.ckpt \(a link to .*epoch=0-step=2\.ckpt\) is truncated.*"
                                           r"no other checkpoint is in"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
