"""The rollout-engine protocol: token ids in, sampled token ids and their logprobs out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

from r3l_lightning.engines.constraints import Constraint


class EngineDeadError(RuntimeError):
    """The rollout engine can serve no more requests (its process died): the run stops, naming the engine; the
    last checkpoint is intact and ``--ckpt_path last`` resumes."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None


@dataclass
class Completion:
    """One sampled continuation.

    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the *processed* distribution
    (after temperature and top-p), comparable with the trainer's at the same temperature.
    ``finish_reason`` is ``"stop"`` when an end-of-turn id was produced (it is the last id),
    ``"length"`` when ``max_new_tokens`` ran out.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: Literal["stop", "length"]


class RolloutEngine(ABC):
    """Generates from the current policy. Bound once to the LightningModule's policy by :meth:`bind`."""

    policy: torch.nn.Module | None = None

    def bind(self, policy: torch.nn.Module, tokenizer, eos_token_ids: list[int]) -> None:
        """Attach the policy whose weights the engine samples from."""
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, constraints: list[Constraint | None] | None = None
    ) -> list[list[Completion]]:
        """For every prompt (token ids), ``params.n`` completions.

        ``constraints`` (one per prompt, ``None`` for an unconstrained prompt): decode that prompt's
        completions under a JSON schema or a grammar (:class:`~r3l_lightning.engines.constraints.Constraint`),
        so that the text matches it unless the token budget runs out first. Both built-in engines use
        xgrammar for it.
        """

    def sync_weights(self) -> None:
        """Make the engine sample from the policy's current weights (no-op when it IS the policy)."""

    def sleep(self) -> None:
        """Free the engine's own memory while training; called where every rank does, after a rollout phase
        (no-op for an engine without its own weights). The next :meth:`sync_weights` makes it usable again."""

    def on_policy_update(self, step: int) -> None:
        """Called by the LightningModule after every optimizer step (``step`` counts from 1)."""

    def max_context(self) -> int | None:
        """The longest prompt + completion the engine accepts, if it has a limit."""
        return None
