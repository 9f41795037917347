"""JSON-schema constrained decoding with xgrammar, shared by the engines.

xgrammar is the grammar engine inside vLLM, SGLang and TensorRT-LLM; vLLM compiles the schema of a
request with it, and :class:`SchemaGrammars` compiles the same schema the same way (``any_whitespace=False``)
for ``transformers`` ``generate``, so both engines accept exactly the same texts.
"""

from __future__ import annotations

import json


def schema_key(schema: dict) -> str:
    """A schema as the JSON text the grammar compiler receives (and the cache key). Keys keep their
    order: xgrammar makes the decoder write an object's properties in the order the schema lists them."""
    return json.dumps(schema, ensure_ascii=False)


class SchemaGrammars:
    """Compiles JSON schemas for one tokenizer (cached per schema) and builds HF logits processors.

    Args:
        tokenizer: the policy's HF tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary).
        stop_token_ids: the ids that end a turn; the grammar allows them once the document is complete.
        cache_size: compiled grammars kept (a schema depends on the trajectory's length and reward, so
            there are few distinct ones).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = 256) -> None:
        try:
            import xgrammar as xgr
        except ImportError as err:  # pragma: no cover - xgrammar is a dependency of the project
            raise ImportError("schema-constrained decoding needs xgrammar: pip install xgrammar") from err
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, object] = {}
        self.cache_size = cache_size

    def compiled(self, schema: dict):
        key = schema_key(schema)
        grammar = self._cache.get(key)
        if grammar is None:
            grammar = self._compiler.compile_json_schema(key, any_whitespace=False)
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = grammar
        return grammar

    def logits_processor(self, schemas: list[dict]):
        """A processor for one ``generate`` call whose batch rows are decoded under ``schemas`` (one per row)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor([self.compiled(s) for s in schemas])
