"""Memory of a LoRA training step against a full fine-tuning step (R3LModule, CPU, fp32).

    python benchmarks/lora_memory.py [--model smollm2-135m-instruct] [--rank 16] [--rows 4] [--length 256] [--steps 2]

Each variant runs in its own process (so that one's allocations never count in the other's): it builds
``R3LModule`` (``model.lora`` on or off), then takes ``--steps`` optimizer steps (forward, backward, AdamW)
on random token rows while a thread samples the process's resident memory every 2 ms. The children run
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the
resident set at once and the sampled peak follows the live tensors instead of the allocator's cache. Printed per variant:
trainable parameters, gradient and AdamW-state bytes (counted from the tensors), resident memory after
loading, the peak during the steps, and the step time; then the LoRA/full ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = rss(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss())


def one_variant(args) -> dict:
    from r3l_lightning.data import collate
    from r3l_lightning.lora import LoRAConfig
    from r3l_lightning.module import R3LModule
    from r3l_lightning.trajectory import TrainingSample

    lora = LoRAConfig(r=args.rank, alpha=2.0 * args.rank) if args.variant == "lora" else None
    module = R3LModule(args.model, lr=1e-5, lora=lora)
    optimizer = module.configure_optimizers()["optimizer"]
    generator = torch.Generator().manual_seed(0)
    vocab = module.policy.config.vocab_size
    half = args.length // 2
    batch = collate([TrainingSample(torch.randint(3, vocab, (args.length,), generator=generator).tolist(),
                                    [0.0] * half + [1.0] * (args.length - half), 1.0 if i % 2 else -1.0, "base")
                     for i in range(args.rows)])
    loaded = rss()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = module.micro_batch_loss(batch, torch.tensor(float(args.rows)), torch.tensor(1.0))
        loss.backward()
        grad_bytes = sum(p.grad.nbytes for p in module.policy.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - start) / args.steps
    peak = sampler.stop()
    state_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "trainable": sum(p.numel() for p in module.policy.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in module.policy.parameters()),
        "grad_mib": grad_bytes / MIB, "adam_mib": state_bytes / MIB, "loaded_mib": loaded / MIB,
        "peak_mib": peak / MIB, "step_peak_mib": (peak - loaded) / MIB, "step_s": step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args)))
        return
    print(f"load average: {os.getloadavg()}; cpus: {os.cpu_count()}; {args.model}, fp32, {args.rows} rows x "
          f"{args.length} tokens, {args.steps} steps, LoRA r={args.rank} all-linear")
    results = {}
    for variant in ("full", "lora"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                              capture_output=True, text=True, check=True,
                              env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'variant':8s} {'trainable':>12s} {'grads MiB':>10s} {'AdamW MiB':>10s} {'loaded MiB':>11s} "
          f"{'step peak +MiB':>15s} {'peak MiB':>9s} {'step s':>7s}")
    for variant, r in results.items():
        print(f"{variant:8s} {r['trainable'] / 1e6:10.2f} M {r['grad_mib']:10.1f} {r['adam_mib']:10.1f} "
              f"{r['loaded_mib']:11.0f} {r['step_peak_mib']:15.0f} {r['peak_mib']:9.0f} {r['step_s']:7.1f}")
    full, lora = results["full"], results["lora"]
    print(f"lora/full: trainable {lora['trainable'] / full['trainable']:.4f}, step peak above the loaded model "
          f"{lora['step_peak_mib'] / full['step_peak_mib']:.2f}, process peak {lora['peak_mib'] / full['peak_mib']:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
