"""The online experience buffer and the DataModule that serves it as optimizer steps.

Lightning builds the train dataloader BEFORE ``on_train_epoch_start``, where exploration fills the
buffer; so ``train_dataloader()`` returns an :class:`ExperienceDataset` (an ``IterableDataset``) that
drains the buffer when it is iterated, i.e. after the exploration callback ran. (Lightning's default
fetcher prefetches one batch while setting up the first epoch, before that hook: ``R3LModule`` takes
``dataloader_iter`` in ``training_step``, which turns prefetching off.)

One item of the dataset is one optimizer step: a list of micro-batches (dicts of tensors) packed by
a padded-token budget. Equal step counts across ranks: after exploration, every rank reports its
number of steps and of micro-batches per step; all ranks take the elementwise maximum and pad with
zero-weight micro-batches (a two-token sequence with an all-zero loss mask). Every rank therefore
runs the same number of optimizer steps AND forward passes, which DDP and sharded (FSDP) training
both need.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from r3l_lightning.envs.base import Environment, Task, TaskSource
from r3l_lightning.explore.base import Explorer
from r3l_lightning.explore.r3l import R3LExplorer
from r3l_lightning.mismatch import kind_indices
from r3l_lightning.rollout_log import DEFAULT_ROLLOUT_LOG, RolloutLog
from r3l_lightning.trajectory import TrainingSample

MicroBatch = dict[str, torch.Tensor]
ReduceMax = Callable[[list[int]], list[int]]


class ExperienceBuffer:
    """RL groups and SFT samples produced by exploration, waiting to be trained on."""

    def __init__(self) -> None:
        self.groups: list[list[TrainingSample]] = []
        self.sft: list[TrainingSample] = []

    def put(self, groups: list[list[TrainingSample]], sft: list[TrainingSample]) -> None:
        self.groups += groups
        self.sft += sft

    def drain(self) -> tuple[list[list[TrainingSample]], list[TrainingSample]]:
        groups, sft = self.groups, self.sft
        self.groups, self.sft = [], []
        return groups, sft

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups) + len(self.sft)


def collate(samples: list[TrainingSample]) -> MicroBatch:
    """Right-padded (id 0, attention 0) tensors: input_ids, attention_mask, loss_mask, advantages, is_sft and
    shaped (the rows whose ``TrainingSample.objective`` is sft / shaped), old_logprobs, kind (index into
    :data:`~r3l_lightning.mismatch.SAMPLE_KINDS`)."""
    width = max(len(s.input_ids) for s in samples)
    n = len(samples)
    batch = {
        "input_ids": torch.zeros((n, width), dtype=torch.long),
        "attention_mask": torch.zeros((n, width), dtype=torch.long),
        "loss_mask": torch.zeros((n, width), dtype=torch.float32),
        "old_logprobs": torch.zeros((n, width), dtype=torch.float32),
        "has_old_logprobs": torch.zeros(n, dtype=torch.bool),
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        "is_sft": torch.tensor([s.is_sft for s in samples], dtype=torch.bool),
        "shaped": torch.tensor([s.objective == "shaped" for s in samples], dtype=torch.bool),
        "assistant_tokens": torch.tensor([s.num_assistant_tokens for s in samples], dtype=torch.float32),
        "kind": kind_indices([s.kind for s in samples]),
    }
    # equivalent mutants: dtype=None or left out in the torch.tensor calls for input_ids, loss_mask and
    # old_logprobs below (assignment converts into the preallocated tensor's dtype) and for is_sft and shaped
    # above (a list of bools is a bool tensor)
    for i, s in enumerate(samples):
        length = len(s.input_ids)
        batch["input_ids"][i, :length] = torch.tensor(s.input_ids, dtype=torch.long)
        batch["attention_mask"][i, :length] = 1
        batch["loss_mask"][i, :length] = torch.tensor(s.loss_mask, dtype=torch.float32)
        if s.old_logprobs is not None:
            batch["old_logprobs"][i, :length] = torch.tensor(s.old_logprobs, dtype=torch.float32)
            batch["has_old_logprobs"][i] = True
    return batch


def padding_micro_batch() -> MicroBatch:
    """A zero-weight micro-batch that keeps ranks' forward passes in lockstep."""
    return collate([TrainingSample([0, 0], [0.0, 0.0], 0.0, "base")])


def pack(samples: list[TrainingSample], max_tokens: int) -> list[list[TrainingSample]]:
    """Greedy packing in order: a micro-batch's padded size (count × longest) stays within ``max_tokens``.

    A single sample longer than the budget gets a micro-batch of its own.
    """
    batches: list[list[TrainingSample]] = []
    current: list[TrainingSample] = []
    longest = 0  # equivalent mutants: 1 here and below (a sample has at least one token: max(1, length) = length)
    for s in samples:
        length = len(s.input_ids)
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(s)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def plan_steps(
    groups: list[list[TrainingSample]],
    sft: list[TrainingSample],
    groups_per_step: int,
    max_tokens: int,
    rng: random.Random,
) -> list[list[list[TrainingSample]]]:
    """Shuffle groups into mini-batches of ``groups_per_step`` groups (one optimizer step each),
    spread SFT samples evenly over the steps, and pack every step into micro-batches, shortest samples
    first: similar lengths share a micro-batch, so little of it is padding (length bucketing). A step's
    loss is a sum over its samples with step-level denominators, so their order within the step does
    not change it."""
    groups = list(groups)
    sft = list(sft)
    rng.shuffle(groups)
    rng.shuffle(sft)
    num_steps = max(math.ceil(len(groups) / groups_per_step), 1 if sft else 0)
    steps = []
    for i in range(num_steps):
        samples = [s for g in groups[i * groups_per_step : (i + 1) * groups_per_step] for s in g]
        samples += sft[i::num_steps]
        steps.append(pack(sorted(samples, key=lambda s: len(s.input_ids)), max_tokens))
    return steps


def equalize(
    steps: list[list[list[TrainingSample]]], reduce_max: ReduceMax | None
) -> tuple[int, list[int]]:
    """Agree with the other ranks on the number of steps and micro-batches per step (elementwise max)."""
    counts = [len(s) for s in steps]
    if reduce_max is None:
        return len(counts), counts
    (num_steps,) = reduce_max([len(counts)])
    padded = counts + [0] * (num_steps - len(counts))
    return num_steps, reduce_max(padded)


def _as_is(step: list[MicroBatch]) -> list[MicroBatch]:
    return step


class ExperienceDataset(IterableDataset):
    """Drains the DataModule's buffer when iterated; yields one optimizer step (micro-batch list) at a time."""

    def __init__(self, datamodule: ExperienceDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        yield from self.datamodule.take_planned_steps()
        self.datamodule.untrained_steps = []  # the epoch's steps are all trained


class ExperienceDataModule(L.LightningDataModule):
    """Task sources + environment + explorer + the online exploration-group buffer.

    Args:
        environment: the task rules (system prompt, episodes, rewards).
        train_tasks: tasks explored during training, visited in a seeded shuffled order.
        eval_tasks: held-out tasks for evaluation (``None``: no evaluation tasks).
        explorer: turns tasks into groups + SFT samples (R³L by default; baselines and users' own
            classes plug in here). ``ExplorationCallback`` runs it every epoch.
        tasks_per_epoch: tasks explored per epoch, summed over all ranks.
        groups_per_step: exploration groups (tasks) per optimizer step, summed over all ranks.
        max_tokens_per_micro_batch: padded-token budget (rows × longest row) of one forward pass.
        seed: seeds the task order and the per-epoch shuffling of groups.
        rollout_log: what ``<log_dir>/rollouts/`` keeps of the explored groups and evaluation rollouts
            (:class:`~r3l_lightning.rollout_log.RolloutLog`; ``r3l view`` shows them).
    """

    def __init__(
        self,
        environment: Environment,
        train_tasks: TaskSource,
        eval_tasks: TaskSource | None = None,
        explorer: Explorer | None = None,
        tasks_per_epoch: int = 8,
        groups_per_step: int = 8,
        max_tokens_per_micro_batch: int = 4096,
        seed: int = 0,
        rollout_log: RolloutLog = DEFAULT_ROLLOUT_LOG,
    ) -> None:
        super().__init__()
        if groups_per_step < 1:
            raise ValueError(f"data.groups_per_step must be >= 1, got {groups_per_step}")
        if len(train_tasks) == 0:
            raise ValueError("data.train_tasks is empty: point it at a task source with at least one task")
        self.environment = environment
        self.train_tasks = train_tasks
        self.eval_tasks = eval_tasks
        self.explorer = explorer if explorer is not None else R3LExplorer()
        self.tasks_per_epoch = tasks_per_epoch
        self.groups_per_step = groups_per_step
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.seed = seed
        self.rollout_log = rollout_log
        self.buffer = ExperienceBuffer()
        self.task_cursor = 0
        self._epoch = 0
        self._planned: list[list[MicroBatch]] | None = None
        # the steps of the running epoch not trained yet (saved in a checkpoint written mid-epoch)
        self.untrained_steps: list[list[MicroBatch]] = []

    # ----- tasks -------------------------------------------------------------------------------
    def _task_index(self, position: int) -> int:
        size = len(self.train_tasks)
        epoch, offset = divmod(position, size)
        order = list(range(size))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order[offset]

    def next_train_tasks(self, count: int, rank: int = 0, world_size: int = 1) -> list[Task]:
        """The next ``count`` tasks of the shared order; this rank gets positions ``rank::world_size``.

        Every rank advances the cursor by ``count``, so all ranks stay at the same position.
        """
        positions = range(self.task_cursor, self.task_cursor + count)
        self.task_cursor += count
        return [self.train_tasks[self._task_index(p)] for p in positions[rank::world_size]]

    def eval_task_list(self, limit: int | None = None) -> list[Task]:
        if self.eval_tasks is None:
            return []
        n = len(self.eval_tasks) if limit is None else min(limit, len(self.eval_tasks))
        return [self.eval_tasks[i] for i in range(n)]

    # ----- experience ----------------------------------------------------------------------------
    def plan_epoch(self, world_size: int = 1, reduce_max: ReduceMax | None = None) -> int:
        """Turn the buffer into this epoch's optimizer steps; returns their number.

        ``reduce_max`` (elementwise max over ranks) must be given under multi-process training.
        """
        groups, sft = self.buffer.drain()
        per_rank = max(1, math.ceil(self.groups_per_step / world_size))
        rng = random.Random(f"{self.seed}-epoch-{self._epoch}")
        self._epoch += 1
        steps = plan_steps(groups, sft, per_rank, self.max_tokens_per_micro_batch, rng)
        num_steps, counts = equalize(steps, reduce_max)
        planned = []
        for i in range(num_steps):
            micro = [collate(mb) for mb in (steps[i] if i < len(steps) else [])]
            micro += [padding_micro_batch() for _ in range(counts[i] - len(micro))]
            planned.append(micro)
        self._planned = planned
        return num_steps

    def planned_steps(self) -> list[list[MicroBatch]]:
        """This epoch's optimizer steps, planned now if the buffer was filled without the exploration callback
        (single-process planning)."""
        if self._planned is None:
            self.plan_epoch()
        return self._planned

    def take_planned_steps(self) -> list[list[MicroBatch]]:
        """This epoch's steps, handed to the training loop; they count as untrained until :meth:`step_trained`."""
        planned, self._planned = self.planned_steps(), None
        self.untrained_steps = list(planned)
        return planned

    def step_trained(self) -> None:
        """The training loop is done with the first untrained step (applied, or skipped for a non-finite loss)."""
        self.untrained_steps = self.untrained_steps[1:]

    def train_dataloader(self) -> DataLoader:
        # equivalent mutants: collate_fn None or left out (unbatched items go through default_convert, which keeps
        # a list of dicts of tensors as it is)
        return DataLoader(ExperienceDataset(self), batch_size=None, collate_fn=_as_is)

    def state_dict(self) -> dict:
        """Task-sampler position, shuffling epoch and explorer state (saved in every checkpoint), and the running
        epoch's untrained steps: a checkpoint written mid-epoch (preemption) resumes by training exactly those.
        Multi-process runs save none (a checkpoint holds rank 0's state only): their resume skips the rest of that
        epoch."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {"task_cursor": self.task_cursor, "epoch": self._epoch, "explorer": self.explorer.state_dict(),
                "untrained_steps": self.untrained_steps if world_size == 1 else []}

    def load_state_dict(self, state_dict: dict) -> None:
        self.task_cursor = state_dict["task_cursor"]
        self._epoch = state_dict["epoch"]
        self.explorer.load_state_dict(state_dict.get("explorer", {}))
        self.untrained_steps = list(state_dict.get("untrained_steps", []))
        self._planned = list(self.untrained_steps) if self.untrained_steps else None
