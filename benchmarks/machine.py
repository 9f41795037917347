"""This machine's matmul rate at a model's GEMM shapes: the ceiling the speed benchmarks divide by."""

from __future__ import annotations

import time

import torch


def linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer of the model, lm_head included."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_rate(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, device: torch.device,
                repeats: int = 5) -> float:
    """FLOP/s of plain ``torch.matmul`` over ``rows`` × each shape (best of ``repeats`` passes)."""
    weights = [torch.randn(i, o, device=device, dtype=dtype) for i, o in shapes]
    inputs = [torch.randn(rows, i, device=device, dtype=dtype) for i, _ in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for x, w in zip(inputs, weights):  # warm-up
        torch.matmul(x, w)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for x, w in zip(inputs, weights):
            torch.matmul(x, w)
        sync()
        best = min(best, time.perf_counter() - start)
    return flops / best
