"""Checkpoint size and save time for a policy + AdamW state, AtomicCheckpointIO vs Lightning's default.

    python benchmarks/checkpoint_save.py [--model smollm2-135m-instruct] [--dir runs/bench-ckpt]

Builds the checkpoint dict a training run writes (fp32 policy weights + AdamW moments), saves it with
``AtomicCheckpointIO`` (r3l's default) and with Lightning's ``TorchCheckpointIO`` side by side, and
prints the file size, each save's wall time, and each save's growth of the process's peak RSS
(Lightning's default first serialises the whole checkpoint into memory). The atomic save runs first,
so its peak-RSS growth is not hidden by the other's.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from r3l_lightning.checkpoint_io import AtomicCheckpointIO
from r3l_lightning.models import load_policy


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dir", default="runs/bench-ckpt")
    args = parser.parse_args()

    policy = load_policy(args.model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    for p in policy.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the AdamW moments
    checkpoint = {"state_dict": policy.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    params = sum(p.numel() for p in policy.parameters())

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}: {params / 1e6:.1f} M params, fp32 weights + AdamW moments; peak RSS {peak_rss_mib():.0f} MiB")
    for name, io in (("atomic (r3l default)", AtomicCheckpointIO()), ("lightning TorchCheckpointIO", TorchCheckpointIO())):
        path = out / f"{name.split()[0]}.ckpt"
        before = peak_rss_mib()
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        elapsed = time.perf_counter() - start
        print(f"{name:28s}: {path.stat().st_size / 2**20:7.0f} MiB in {elapsed:5.2f} s "
              f"({path.stat().st_size / 2**20 / elapsed:6.0f} MiB/s), peak RSS +{peak_rss_mib() - before:.0f} MiB")
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
