"""AtomicCheckpointIO: a failed save leaves the previous checkpoint intact; ``r3l`` installs it."""

from __future__ import annotations

import os
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
