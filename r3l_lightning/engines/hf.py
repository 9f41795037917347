"""Rollouts with ``transformers`` ``generate`` on the policy itself (no second copy of the weights)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

from r3l_lightning.engines.base import Completion, RolloutEngine, SamplingParams
from r3l_lightning.engines.constraints import CompiledConstraints, Constraint
from r3l_lightning.lora import named_inference_weights
from r3l_lightning.models import is_sharded


class HFEngine(RolloutEngine):
    """Batched, left-padded ``generate`` on the training policy.

    Prompts are processed in chunks of ``max_batch_size`` sequences (prompt × n). Logprobs are the
    processed scores (after temperature / top-p) of the sampled ids.

    Sharded (FSDP1/FSDP2) policies: every forward of a sharded model is a collective, but ranks explore
    different tasks and so make different numbers of generate calls. Instead of keeping every call in
    lockstep, :meth:`sync_weights` (called by the callbacks at points every rank reaches) gathers the
    full weights into an unsharded inference copy that generation then uses locally. ``synced_gpus``
    is HF's lockstep alternative, usable only when every rank makes the same generate calls.
    """

    def __init__(self, max_batch_size: int = 64, synced_gpus: bool = False) -> None:
        self.max_batch_size = max_batch_size
        self.synced_gpus = synced_gpus

    def bind(self, policy, tokenizer, eos_token_ids) -> None:
        super().bind(policy, tokenizer, eos_token_ids)
        self._inference_copy = None
        self._compiled: CompiledConstraints | None = None

    def sync_weights(self) -> None:
        """Refresh the unsharded inference copy of a sharded policy, one gathered tensor at a time
        (collective under FSDP1/FSDP2; no-op for an unsharded policy)."""
        if not is_sharded(self.policy):
            self._inference_copy = None
            return
        if self._inference_copy is None:
            dtype = next(self.policy.parameters()).dtype
            self._inference_copy = AutoModelForCausalLM.from_config(self.policy.config, dtype=dtype).eval()
            self._inference_copy.generation_config = self.policy.generation_config
            self._inference_copy.to(self._device())
        target = self._inference_copy.state_dict()
        with torch.no_grad():
            for name, tensor in named_inference_weights(self.policy):  # LoRA merged in
                target[name].copy_(tensor)

    def max_context(self) -> int | None:
        """The policy's position limit (prompt + completion)."""
        return getattr(self.policy.config, "max_position_embeddings", None)

    def _model(self):
        return self._inference_copy if self._inference_copy is not None else self.policy

    def _synced(self) -> bool:
        return self.synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized()

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, constraints: list[Constraint | None] | None = None
    ) -> list[list[Completion]]:
        if self.policy is None:
            raise RuntimeError("HFEngine.generate called before bind(policy, tokenizer, eos_token_ids)")
        if constraints is not None:
            if len(constraints) != len(prompts):
                raise ValueError(f"constraints has {len(constraints)} entries for {len(prompts)} prompts")
            constrained = [i for i, c in enumerate(constraints) if c is not None]
            if not constrained:
                constraints = None
            elif len(constrained) < len(prompts):  # a grammar per row: generate the two kinds apart
                free = [i for i, c in enumerate(constraints) if c is None]
                results: dict[int, list[Completion]] = {}
                for part, kinds in ((constrained, [constraints[i] for i in constrained]), (free, None)):
                    results.update(zip(part, self.generate([prompts[i] for i in part], params, kinds)))
                return [results[i] for i in range(len(prompts))]
        per_chunk = max(1, self.max_batch_size // params.n)
        results: list[list[Completion]] = []
        synced = self._synced()
        # Under lockstep every rank must make the same number of generate calls.
        num_chunks = (len(prompts) + per_chunk - 1) // per_chunk
        if synced:
            count = torch.tensor([num_chunks], device=self._device())
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            num_chunks = int(count.item())
        for c in range(num_chunks):
            chunk = prompts[c * per_chunk : (c + 1) * per_chunk]
            if not chunk:  # this rank is done; keep the others company with a dummy prompt
                self._generate_chunk([prompts[0] if prompts else [self.eos_token_ids[0]]], params, synced)
                continue
            kinds = None if constraints is None else constraints[c * per_chunk : (c + 1) * per_chunk]
            results += self._generate_chunk(chunk, params, synced, kinds)
        return results

    def _device(self) -> torch.device:
        param = next(self.policy.parameters())
        return param.to_local().device if hasattr(param, "to_local") else param.device

    def _grammar_processors(self, constraints: list[Constraint] | None, rows_per_prompt: int) -> LogitsProcessorList | None:
        if constraints is None:
            return None
        if self._compiled is None:
            vocab = self._model().config.vocab_size
            self._compiled = CompiledConstraints(self.tokenizer, vocab, self.eos_token_ids)
        rows = [c for c in constraints for _ in range(rows_per_prompt)]  # generate's rows: prompt-major
        return LogitsProcessorList([self._compiled.logits_processor(rows)])

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams, synced: bool,
                        constraints: list[Constraint] | None = None):
        device = self._device()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        attention = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            attention[i, width - len(p) :] = 1
        greedy = params.temperature <= 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy or params.top_p >= 1.0 else params.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=1 if greedy else params.n,
            eos_token_id=self.eos_token_ids,
            pad_token_id=pad,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        model = self._model()
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                 synced_gpus=synced,
                                 logits_processor=self._grammar_processors(constraints, 1 if greedy else params.n))
        finally:
            model.train(was_training)
        new_tokens = out.sequences[:, width:]
        steps = len(out.scores)
        logprobs = torch.stack(
            [torch.log_softmax(out.scores[s].float(), dim=-1).gather(1, new_tokens[:, s : s + 1]).squeeze(1)
             for s in range(steps)],
            dim=1,
        ) if steps else torch.zeros(new_tokens.shape, device=device)
        eos = set(self.eos_token_ids)
        completions: list[Completion] = []
        for row, lp in zip(new_tokens.tolist(), logprobs.tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
            finish = "stop" if end is not None else "length"
            end = end if end is not None else min(len(row), params.max_new_tokens)
            completions.append(Completion(row[:end], lp[:end], finish))
        if greedy:  # n identical greedy continuations
            return [[c] + [Completion(list(c.token_ids), list(c.logprobs), c.finish_reason) for _ in range(params.n - 1)]
                    for c in completions]
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]
