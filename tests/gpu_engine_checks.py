"""VLLMEngine's GPU path in one process against the fake CUDA vLLM (tests/fake_vllm.py); run in its own pytest
process by tests/test_gpu_path.py (vLLM's modules are imported)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_vllm import FakeGPUVLLMEngine  # noqa: E402
from gloo_group import one_process_gloo_group  # noqa: E402
from r3l_lightning.engines.base import SamplingParams  # noqa: E402
from r3l_lightning.engines.vllm import RANK_SEED_STRIDE  # noqa: E402
from r3l_lightning.lora import named_inference_weights  # noqa: E402
from r3l_lightning.models import TINY_RANDOM, eos_token_ids, load_policy, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    policy, tokenizer = load_policy(TINY_RANDOM), load_tokenizer(TINY_RANDOM)
    return policy, tokenizer, eos_token_ids(policy, tokenizer)


def _engine(model, **kwargs) -> FakeGPUVLLMEngine:
    engine = FakeGPUVLLMEngine(**kwargs)
    engine.bind(*model)
    return engine


def test_tp2_in_one_process_hands_the_mp_workers_picklable_buckets_of_the_policys_weights(model):
    engine = _engine(model, tensor_parallel_size=2, sync_bucket_mib=0.5)
    engine.sync_weights()  # RecordingLLM pickles every RPC of the mp executor: a generator would raise here
    llm = engine.llm
    assert llm.backend == "mp" and "distributed_executor_backend" not in llm.kwargs
    assert llm.events.count("r3l_load_weight_bucket") > 1 and "r3l_reload_weights" not in llm.events
    expected = dict(named_inference_weights(model[0]))
    assert set(llm.loaded) == set(expected)
    for name, tensor in expected.items():  # sent in the engine's dtype (bf16 on GPUs)
        assert torch.equal(llm.loaded[name], tensor.to(torch.bfloat16)), name


class _RecordingCPUEngine(FakeGPUVLLMEngine):
    _on_gpu = staticmethod(lambda: False)


def test_kv_blocks_are_32_tokens_on_cpu_unless_engine_kwargs_say_otherwise_and_vllms_choice_on_gpus(model):
    sizes = []
    for engine in (_RecordingCPUEngine(enable_sleep_mode=False),
                   _RecordingCPUEngine(enable_sleep_mode=False, engine_kwargs={"block_size": 128}),
                   FakeGPUVLLMEngine()):
        engine.bind(*model)
        engine.sync_weights()
        sizes.append(engine.llm.kwargs.get("block_size"))
        engine.close()
    assert sizes == [32, 128, None]


def test_single_gpu_engine_sits_on_the_trainers_gpu_not_gpu_0(model):
    engine = _engine(model, first_gpu=3)  # devices: [3]
    engine.sync_weights()
    assert engine.llm.backend == "external_launcher"
    assert engine.llm.distributed_args == ("env://", 0, 3)
    assert engine.current_gpu == 3


def test_sync_points_skip_when_no_optimizer_step_happened(model):
    engine = _engine(model)
    engine.sync_weights()
    engine.sync_weights()
    assert (engine.syncs, engine.syncs_skipped) == (1, 1)
    for step in (1, 2, 3):
        engine.on_policy_update(step)
    assert engine.llm.events.count("r3l_reload_weights") == 1  # steps only count
    engine.sync_weights()
    assert (engine.syncs, engine.syncs_skipped) == (2, 1)


def test_sleep_then_sync_wakes_weights_first_and_generate_wakes_the_kv_cache(model):
    engine = _engine(model)
    engine.sync_weights()
    engine.sleep()
    start = len(engine.llm.events)
    engine.sync_weights()  # no step since, but level 2 discarded the weights: reload
    assert engine.llm.events[start - 1:] == ["sleep:2", "wake:weights", "r3l_reload_weights", "reset_prefix_cache"]
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, seed=5))
    assert engine.llm.events[-2:] == ["wake:kv_cache", "generate"]
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, seed=5))
    assert engine.llm.events[-2:] == ["generate", "generate"]  # awake: no second wake


def test_generate_after_sleep_in_one_process_reloads_before_sampling(model):
    engine = _engine(model)
    engine.sync_weights()
    engine.sleep()
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, seed=5))
    assert engine.llm.events[-6:] == ["sleep:2", "wake:weights", "r3l_reload_weights", "reset_prefix_cache",
                                      "wake:kv_cache", "generate"]


def test_every_request_is_seeded_and_unseeded_calls_follow_pythons_random(model):
    engine = _engine(model)
    engine.sync_weights()
    engine.generate([[1], [2], [3]], SamplingParams(max_new_tokens=2, seed=7))
    assert engine.llm.seeds == [7, 8, 9]  # rank 0: no offset
    random.seed(11)
    engine.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    first = engine.llm.seeds
    random.seed(11)  # a resumed run restores Python's random state from the checkpoint
    engine.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    assert engine.llm.seeds == first and None not in first and first[1] == first[0] + 1
    assert RANK_SEED_STRIDE > 10**6  # rank r's seeds start a stride above rank r - 1's


@pytest.fixture()
def trainer_group():
    """A 1-process gloo group standing in for the trainer's (Lightning creates it before any engine)."""
    with one_process_gloo_group():
        yield


def test_closing_an_engine_runs_vllms_shutdown_but_keeps_the_trainers_process_group(model, trainer_group):
    engine = _engine(model)
    engine.sync_weights()
    llm = engine.llm
    engine.close()
    assert llm.events[-1] == "shutdown"  # vLLM's cleanup ran (it destroys the default group unless kept)
    assert dist.is_initialized()
    ones = torch.ones(1)
    dist.all_reduce(ones)
    assert ones.item() == 1.0


def test_a_second_engine_closes_the_first_which_restarts_at_its_next_sync(model, trainer_group):
    fit_engine, eval_engine = _engine(model), _engine(model)
    fit_engine.sync_weights()
    first_llm = fit_engine.llm
    eval_engine.sync_weights()  # fit, then evaluate with another engine in the same process
    assert fit_engine.llm is None and first_llm.events[-1] == "shutdown"
    assert eval_engine.llm is not None and dist.is_initialized()
    fit_engine.sync_weights()
    assert fit_engine.starts == 2 and eval_engine.llm is None


def test_rebinding_to_another_policy_restarts_the_engine_on_the_new_weights(model, trainer_group):
    engine = _engine(model)
    engine.sync_weights()
    other = load_policy(TINY_RANDOM)
    with torch.no_grad():
        other.model.norm.weight.fill_(2.0)
    engine.bind(other, model[1], model[2])
    assert engine.llm is None
    engine.sync_weights()
    assert engine.starts == 2 and torch.equal(engine.llm.loaded["model.norm.weight"], torch.full((128,), 2.0,
                                                                                                  dtype=torch.bfloat16))


class _HeldSleepPool(FakeGPUVLLMEngine):
    _sleep_pool_bytes = staticmethod(lambda: 4096)  # an earlier engine's tensors still referenced somewhere


def test_sleep_mode_memory_still_held_by_an_earlier_engine_is_a_clear_error(model):
    engine = _HeldSleepPool()
    engine.bind(*model)
    with pytest.raises(RuntimeError, match=r"still holds 4096 bytes of vLLM's sleep-mode memory pool.*close\(\)"):
        engine.sync_weights()
    engine.enable_sleep_mode = False  # the fix the message names
    engine.sync_weights()
    assert engine.starts == 1
