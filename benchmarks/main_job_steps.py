"""The main job's own training steps, recorded from a run and replayed by ``train_step.py --steps-file``.

Record (one JSON file: per optimizer step, each sample's length, trained spans, advantage and kind, as the
DataModule planned them after exploration; padding micro-batches left out):

    PYTHONPATH=benchmarks r3l fit --config configs/countdown/r3l.yaml \\
        --trainer.callbacks+=main_job_steps.RecordSteps --trainer.callbacks.path benchmarks/countdown_steps.json

Replayed samples get seeded random token ids of the recorded lengths: the step's speed depends on the lengths and
the trained positions, not on the tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L

from r3l_lightning.mismatch import SAMPLE_KINDS
from r3l_lightning.trajectory import TrainingSample


class RecordSteps(L.Callback):
    """Writes every epoch's planned optimizer steps to ``path`` (rank 0; rewritten after each epoch's plan)."""

    def __init__(self, path: str = "main_job_steps.json") -> None:
        self.path = Path(path)
        self.steps: list[list[dict]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for step in trainer.datamodule.planned_steps():
            samples = []
            for mb in step:
                for row in range(mb["input_ids"].shape[0]):
                    mask = mb["loss_mask"][row]
                    if not mask.any():  # a padding row or micro-batch: no gradient, not the job's data
                        continue
                    trained = mask.nonzero().flatten().tolist()
                    spans = [[start, end + 1] for start, end in _runs(trained)]
                    samples.append({"length": int(mb["attention_mask"][row].sum()), "trained": spans,
                                    "advantage": float(mb["advantages"][row]),
                                    "kind": SAMPLE_KINDS[int(mb["kind"][row])]})
            self.steps.append(samples)
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"steps": self.steps}) + "\n")


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` of sorted positions."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def load_steps(path: str | Path, vocab: int, seed: int = 0) -> list[list[TrainingSample]]:
    """The recorded steps as training samples with seeded random token ids."""
    rng = random.Random(seed)
    steps = []
    for recorded in json.loads(Path(path).read_text())["steps"]:
        samples = []
        for s in recorded:
            mask = [0.0] * s["length"]
            for start, end in s["trained"]:
                mask[start:end] = [1.0] * (end - start)
            ids = [rng.randrange(vocab) for _ in range(s["length"])]
            samples.append(TrainingSample(ids, mask, s["advantage"], s["kind"], num_assistant_tokens=int(sum(mask))))
        steps.append(samples)
    return steps
