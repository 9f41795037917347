"""Trajectories and training samples: the interface between exploration and training.

Exploration produces :class:`Trajectory` objects (chat messages whose assistant turns carry the exact
token ids the sampler produced). :class:`ChatTokenizer` turns them into token sequences WITHOUT
re-tokenising assistant text, and :func:`make_sample` turns a tokenised trajectory plus an advantage
and a pivot into a :class:`TrainingSample`, the unit the DataModule packs and the LightningModule trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Role = Literal["system", "user", "assistant"]
Objective = Literal["policy", "sft", "shaped"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
SampleKind = str  # a key of SAMPLE_KINDS


@dataclass(frozen=True)
class KindInfo:
    """A sample kind: the objective explorers train it with unless they set another, what it is, and whether
    ``model.rollout_correction`` weights it (its tokens are scored in the context they were sampled in)."""

    objective: Objective
    description: str
    rollout_corrected: bool = False


# Every sample kind, in the order of the micro-batch ``kind`` column and of the mismatch metrics. A kind is a
# label for logs (metrics, records, the console); what a sample trains with is its ``objective``.
SAMPLE_KINDS: dict[str, KindInfo] = {
    "base": KindInfo("policy", "a trajectory sampled from the task's own prompt", rollout_corrected=True),
    "distill": KindInfo("policy", "a guided retry with the base prefix and the guidance removed (R³L, Reflect-GRPO)"),
    "retry": KindInfo("policy", "a verified correction's guided retry as a one-sample RL group (correction_loss: "
                                "reinforce)"),
    "reflection": KindInfo("policy", "a verified correction's reflection as a one-sample RL group"),
    "refinement": KindInfo("shaped", "a critique-guided refinement with the original prompt (Critique-GRPO)"),
    "sft_reflect": KindInfo("sft", "a verified correction's reflection (R³L)"),
    "sft_retry": KindInfo("sft", "a verified correction's guided retry, guidance kept (R³L)"),
    "sft_success": KindInfo("sft", "a successful sample (RAFT)"),
}


@dataclass
class Message:
    """One chat message. Assistant messages carry the sampled ``token_ids`` (and ``logprobs``)."""

    role: Role
    content: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    guidance: bool = False  # a reflection-guidance system message (removed for distill samples)


@dataclass
class Trajectory:
    """A multi-turn episode: messages, terminal reward, and what the environment reported.

    ``turn`` k is the k-th assistant message (0-based).
    """

    messages: list[Message]
    reward: float = 0.0
    task_id: str = ""
    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    feedback: str = ""
    info: dict = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return sum(m.role == "assistant" for m in self.messages)


@dataclass
class TokenizedConversation:
    """Token ids of a rendered conversation with the [start, end) span of every assistant turn."""

    input_ids: list[int]
    turn_spans: list[tuple[int, int]]
    logprobs: list[float | None]


@dataclass
class TrainingSample:
    """One training sequence. ``loss_mask[t] = 1`` iff token t is a trained target.

    ``objective`` is what the loss trains it with: ``policy`` (the RL loss with ``advantage``), ``sft`` (the SFT
    loss, weighted by ``model.loss.sft_coef``) or ``shaped`` (the RL loss with policy shaping, Critique-GRPO's
    refinements); the explorer sets it, or leaves it to the kind's (:data:`SAMPLE_KINDS`). ``kind`` is a label for
    logs; the loss never reads it.
    """

    input_ids: list[int]
    loss_mask: list[float]
    advantage: float
    kind: SampleKind
    group_id: str = ""
    old_logprobs: list[float] | None = None
    num_assistant_tokens: int = 0  # trainable or masked by the pivot; for the masked-fraction metric
    reward: float | None = None  # what the advantage came from, or the SFT trajectory's (records only)
    objective: Objective | None = None  # None: the kind's (SAMPLE_KINDS), set here

    def __post_init__(self) -> None:
        if self.kind not in SAMPLE_KINDS:
            raise ValueError(f"unknown sample kind {self.kind!r}; known: {', '.join(SAMPLE_KINDS)}")
        if self.objective is None:
            self.objective = SAMPLE_KINDS[self.kind].objective
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        # one entry per token: a shorter list would be broadcast (silently) when batched
        for name in ("loss_mask", "old_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.input_ids):
                raise ValueError(f"TrainingSample.{name} has {len(values)} entries for {len(self.input_ids)} tokens")

    @property
    def is_sft(self) -> bool:
        return self.objective == "sft"

    @property
    def num_trainable_tokens(self) -> int:
        return int(sum(1 for m in self.loss_mask if m > 0))


_PLACEHOLDER = "\u2063r3l-assistant-turn-{}\u2063"


class TemplateError(ValueError):
    """The chat template does not render assistant content verbatim."""


class ChatTokenizer:
    """Renders conversations with the tokenizer's chat template, keeping sampled ids verbatim.

    The template is rendered once with a unique placeholder in place of each assistant content.
    The text between placeholders is template/system/user text and is tokenised; each placeholder is
    replaced by the ids the sampler produced. When those ids end with an end-of-turn token, the
    template's copy of that token right after the placeholder is dropped, so the sequence is exactly
    what the sampler saw plus what it produced.
    """

    def __init__(self, tokenizer, eos_token_ids: list[int] | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError(
                f"tokenizer {type(tokenizer).__name__} has no chat_template; set one "
                "(tokenizer.chat_template = ...) or use an instruct model"
            )
        self.tokenizer = tokenizer
        eos = set(eos_token_ids or [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self._eos_text = {i: tokenizer.decode([i]) for i in self.eos_token_ids}

    def encode_text(self, text: str) -> list[int]:
        # equivalent mutant: `if text or True` (a tokenizer encodes "" as [] without special tokens)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (assistant content as stored)."""
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,  # equivalent mutant: tokenize=None (falsy: the text as well)
            add_generation_prompt=add_generation_prompt,
        )

    def tokenize(self, messages: list[Message]) -> TokenizedConversation:
        """Token ids of ``messages``; assistant turns use their sampled ``token_ids``."""
        dicts = []
        turn = 0
        for m in messages:
            content = m.content
            if m.role == "assistant":
                if m.token_ids is None:
                    raise ValueError("assistant message without token_ids: cannot build a training sequence")
                content = _PLACEHOLDER.format(turn)
                turn += 1
            dicts.append({"role": m.role, "content": content})
        # equivalent mutants: tokenize=None (falsy), add_generation_prompt None or left out (its default, False)
        text = self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=False)
        assistant = [m for m in messages if m.role == "assistant"]
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        logprobs: list[float | None] = []
        cursor = 0  # equivalent mutant: None (find and slices read it as 0)
        for k, m in enumerate(assistant):
            marker = _PLACEHOLDER.format(k)
            # equivalent mutants: find from 0, rfind: each marker occurs once in the text
            pos = text.find(marker, cursor)
            if pos < 0:
                raise TemplateError(
                    "the chat template does not render assistant content verbatim (turn "
                    f"{k} not found); R3L needs a template that keeps assistant text as is"
                )
            piece = text[cursor:pos]
            piece_ids = self.encode_text(piece)
            ids += piece_ids
            logprobs += [None] * len(piece_ids)
            start = len(ids)
            ids += list(m.token_ids)
            lp = m.logprobs if m.logprobs is not None and len(m.logprobs) == len(m.token_ids) else None
            logprobs += list(lp) if lp is not None else [None] * len(m.token_ids)
            spans.append((start, len(ids)))
            cursor = pos + len(marker)
            if m.token_ids and m.token_ids[-1] in self._eos_text:
                eos_text = self._eos_text[m.token_ids[-1]]
                if text.startswith(eos_text, cursor):
                    cursor += len(eos_text)
        tail_ids = self.encode_text(text[cursor:])
        ids += tail_ids
        logprobs += [None] * len(tail_ids)
        return TokenizedConversation(ids, spans, logprobs)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Ids the sampler is given to produce the next assistant turn after ``messages``."""
        # equivalent mutants: any content (tokenize renders a placeholder in its place), and turn_spans[-1][1]
        # (the probe's span is empty: start = end)
        probe = self.tokenize(messages + [Message("assistant", "", token_ids=[])])
        return probe.input_ids[: probe.turn_spans[-1][0]]

    def assistant_message(self, token_ids: list[int], logprobs: list[float] | None = None) -> Message:
        """An assistant message for sampled ids; its content is their text without end-of-turn."""
        body = token_ids[:-1] if token_ids and token_ids[-1] in self._eos_text else token_ids
        # equivalent mutant: skip_special_tokens left out (decode's default is False)
        content = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return Message("assistant", content, token_ids=list(token_ids), logprobs=logprobs)


def make_sample(
    conversation: TokenizedConversation,
    advantage: float,
    kind: SampleKind,
    first_trainable_turn: int = 0,
    group_id: str = "",
    reward: float | None = None,
    objective: Objective | None = None,
) -> TrainingSample:
    """A training sample whose loss mask covers assistant turns ``>= first_trainable_turn``.

    ``first_trainable_turn`` is in [0, number of turns] (= the number of turns: nothing trainable).
    ``objective`` None: the kind's (:data:`SAMPLE_KINDS`).
    """
    if not 0 <= first_trainable_turn <= len(conversation.turn_spans):
        raise ValueError(f"first_trainable_turn must be in [0, {len(conversation.turn_spans)}] (the number of "
                         f"assistant turns), got {first_trainable_turn}")
    mask = [0.0] * len(conversation.input_ids)
    for k, (start, end) in enumerate(conversation.turn_spans):
        if k >= first_trainable_turn:
            for t in range(start, end):
                mask[t] = 1.0
    has_logprobs = all(
        conversation.logprobs[t] is not None for t, m in enumerate(mask) if m > 0
    ) and any(m > 0 for m in mask)
    old = [lp if lp is not None else 0.0 for lp in conversation.logprobs] if has_logprobs else None
    assistant_tokens = sum(end - start for start, end in conversation.turn_spans)
    return TrainingSample(list(conversation.input_ids), mask, float(advantage), kind, group_id, old, assistant_tokens,
                          reward, objective)
