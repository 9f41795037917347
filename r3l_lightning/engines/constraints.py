"""Constrained decoding: a completion that must match a JSON schema or an EBNF grammar.

Both engines use xgrammar, the grammar engine inside vLLM, SGLang and TensorRT-LLM. A JSON schema is first
turned into one EBNF grammar (:attr:`Constraint.ebnf`); vLLM receives that grammar (``StructuredOutputsParams``)
and :class:`CompiledConstraints` compiles the same text for ``transformers`` ``generate``, so both engines
accept exactly the same texts whatever the vLLM engine's own JSON whitespace settings are.
JSON is written with single spaces after ``,`` and ``:`` and no other whitespace between tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Constraint:
    """What a completion must match: exactly one of ``json_schema`` (a JSON schema) or ``grammar`` (EBNF in
    xgrammar's dialect, rule ``root`` first, as vLLM's ``grammar`` structured output)."""

    json_schema: dict | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if (self.json_schema is None) == (self.grammar is None):
            raise ValueError("a Constraint takes exactly one of json_schema and grammar")

    @property
    def key(self) -> str:
        """The text the grammar compiler receives. A schema keeps its key order: xgrammar makes the decoder
        write an object's properties in the order the schema lists them."""
        return self.grammar if self.grammar is not None else json.dumps(self.json_schema, ensure_ascii=False)

    @cached_property
    def ebnf(self) -> str:
        """The constraint as an EBNF grammar: ``grammar`` itself, or the schema converted by xgrammar."""
        if self.grammar is not None:
            return self.grammar
        import xgrammar as xgr

        return str(xgr.Grammar.from_json_schema(self.key, any_whitespace=False))

    def vllm_params(self):
        """The same constraint as vLLM's ``StructuredOutputsParams`` (always the EBNF grammar)."""
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams(grammar=self.ebnf)


class CompiledConstraints:
    """Compiles constraints for one tokenizer (cached) and builds HF logits processors.

    Args:
        tokenizer: the policy's HF tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
        stop_token_ids: the ids that end a turn; a constraint allows them once its text is complete.
        cache_size: compiled constraints kept (a reflection's schema depends on the trajectory's length
            and reward, so there are few distinct ones).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, object] = {}
        self.cache_size = cache_size

    def compiled(self, constraint: Constraint):
        key = constraint.key
        grammar = self._cache.get(key)
        if grammar is None:
            grammar = self._compiler.compile_grammar(constraint.ebnf)
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = grammar
        return grammar

    def logits_processor(self, constraints: list[Constraint]):
        """A processor for one ``generate`` call whose batch rows are decoded under ``constraints`` (one per row)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor([self.compiled(c) for c in constraints])
