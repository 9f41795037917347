"""Crash-safe files (checkpoints, rollout logs): write beside the target, fsync, rename into place."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the checkpoint's directory, ``fsync``, then
    ``os.replace`` onto the target: a crash or kill during a save leaves the previous file intact and
    never a partial one. (Lightning's default buffers the whole checkpoint in memory and moves it
    from the system temp directory, which is a non-atomic copy when that is another filesystem.)
    Remote URLs (``s3://`` …) fall back to Lightning's implementation. ``r3l`` installs this by
    default; a ``CheckpointIO`` given in ``trainer.plugins`` is kept instead.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save atomically; a full disk raises an ``OSError`` that names the file and says the previous one is
        intact."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            directory = Path(path).parent
            free_mib = shutil.disk_usage(directory).free / 2**20
            raise OSError(err.errno, f"checkpoint {path} was not written: {os.strerror(err.errno)} ({free_mib:.0f} MiB "
                                     f"free in {directory}); the previous checkpoint there is intact. Free space or "
                                     "set ModelCheckpoint's dirpath to another disk, then resume with --ckpt_path "
                                     "last") from err

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load a checkpoint; a truncated or corrupt file raises a ``RuntimeError`` naming it (and the file a
        ``last.ckpt`` link points to) and the other checkpoints beside it, newest first, to resume from instead."""
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            if "://" in str(path):
                raise
            target = Path(path)
            named = f"{target} (a link to {target.resolve()})" if target.is_symlink() else str(target)
            others = sorted((p for p in target.parent.glob("*.ckpt") if p.resolve() != target.resolve()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
            advice = (f"resume from the previous checkpoint instead: --ckpt_path {others[0]}" if others
                      else f"no other checkpoint is in {target.parent}; start the run anew")
            raise RuntimeError(f"checkpoint {named} is truncated or corrupt ({err}); {advice}") from err


_UMASK_LOCK = threading.Lock()


def umask_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (``0o666 & ~umask``, 0o644 for umask 022)."""
    with _UMASK_LOCK:  # the umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: _PATH, mode: str = "wb") -> Iterator[IO]:
    """A file object whose content replaces ``path`` only once the block ends without an error:
    written beside the target, flushed, fsynced, then ``os.replace``d onto it (parents are created).
    The file gets the mode of any new file under the umask (``mkstemp``'s own 0o600 would hide a run's
    checkpoints and rollout logs from colleagues on a shared filesystem)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, umask_file_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
