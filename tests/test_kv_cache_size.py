"""Sizing VLLMEngine's CPU KV cache from a model config (no vLLM needed: plain arithmetic on HF configs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, Qwen3Config

from r3l_lightning.engines.vllm import CPU_KV_BLOCK_TOKENS, kv_cache_bytes_per_token, kv_cache_gib_for

# SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, hidden 576 → head_dim 64
SMOLLM2 = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)


def test_bytes_per_token_of_smollm2_in_fp32_and_bf16():
    assert kv_cache_bytes_per_token(SMOLLM2, "float32") == 2 * 30 * 3 * 64 * 4 == 46_080
    assert kv_cache_bytes_per_token(SMOLLM2, "bfloat16") == 23_040


def test_bytes_per_token_uses_an_explicit_head_dim():
    # Qwen3-0.6B: head_dim 128 although hidden / heads = 1024 / 16 = 64
    config = Qwen3Config(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         num_hidden_layers=28)
    assert kv_cache_bytes_per_token(config, "bfloat16") == 2 * 28 * 8 * 128 * 2 == 114_688


def test_bytes_per_token_without_kv_heads_or_head_dim_is_multi_head_attention():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64)  # 4 KV heads of 16
    assert kv_cache_bytes_per_token(config, "float32") == 2 * 2 * 4 * 16 * 4 == 1_024


BLOCK = 128 * 46_080  # one 128-token block of SmolLM2 in fp32: 5,898,240 B


@pytest.mark.parametrize(("sequences", "tokens", "max_model_len", "block_tokens", "gib"), [
    # vs_trl: 16 sequences of 112 + 64 tokens = 2 blocks each, 32 blocks; the 4,096-token floor is also 32 blocks;
    # + the null block: 33 × 5,898,240 B = 0.1813 GiB → 0.19
    (16, 176, 4096, 128, 0.19),
    # 16 × 400 tokens = 4 blocks each, 64 (above the floor) + 1: 65 × 5,898,240 B = 0.3571 GiB → 0.36
    (16, 400, 4096, 128, 0.36),
    # one short sequence: the floor (one max_model_len sequence) rules, as in the first case
    (1, 10, 4096, 128, 0.19),
    # 16-token blocks: 16 × ceil(176 / 16) = 176 blocks, below the floor 4,096 / 16 = 256; 257 × 16 × 46,080 B
    # = 0.1765 GiB → 0.18
    (16, 176, 4096, 16, 0.18),
    # max_model_len 256: floor 2 blocks; 8 sequences × 2 blocks + 1 = 17 × 5,898,240 B = 0.0934 GiB → 0.10
    (8, 176, 256, 128, 0.10),
])
def test_gib_for_concurrent_sequences_in_whole_blocks_with_the_null_block(sequences, tokens, max_model_len,
                                                                            block_tokens, gib):
    assert kv_cache_gib_for(SMOLLM2, "float32", sequences, tokens, max_model_len, block_tokens) == gib


def test_gib_is_rounded_up_so_the_engine_gets_every_block():
    gib = kv_cache_gib_for(SMOLLM2, "float32", 16, 400, 4096, 128)
    assert int(gib * 2**30) // BLOCK >= 65  # VLLMEngine passes int(kv_cache_gib · 2^30); vLLM floors to blocks


def test_the_default_block_is_the_engines_cpu_block_of_32_tokens():
    # 16 × ceil(400 / 32) = 16 × 13 = 208 blocks (above the floor 4,096 / 32 = 128) + the null block:
    # 209 × 32 × 46,080 B = 0.2870 GiB → 0.29
    assert CPU_KV_BLOCK_TOKENS == 32
    assert kv_cache_gib_for(SMOLLM2, "float32", 16, 400, 4096) == 0.29
