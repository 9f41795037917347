"""VLLMEngine with a LoRA policy, both sync paths (merged weights, vLLM adapters): its greedy generations
equal the HF merged model's, before and after an optimizer step on the adapters.

Run in their own process (tests/test_engine_vllm.py, see isolated.py). fp32 engines: the two sides then
differ only by kernel accumulation order (see vllm_engine_checks.py for the tolerance's reasoning).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("peft")

from r3l_lightning.engines.base import SamplingParams  # noqa: E402
from r3l_lightning.engines.vllm import VLLMEngine  # noqa: E402
from r3l_lightning.lora import LoRAConfig, add_lora  # noqa: E402
from r3l_lightning.models import TINY_RANDOM, eos_token_ids, load_policy, load_tokenizer  # noqa: E402

PROMPTS = [[1, 9, 42, 7, 300], [1, 55], [1, 8, 8, 8, 8, 8, 8, 900], [1, 4000, 4001, 17, 23, 99]]
NEW_TOKENS = 12
LOGPROB_ATOL = 1e-3


def merged_greedy(policy) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy ids and logprobs of ``merge_and_unload()`` on a copy: PEFT's own merge, not ours."""
    merged = copy.deepcopy(policy).merge_and_unload().eval()
    ids_out, lps_out = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
            new = out.sequences[0, len(prompt):]
            lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
            ids_out.append(new.tolist())
            lps_out.append(lps)
    return ids_out, lps_out


def engine_greedy(engine) -> tuple[list[list[int]], list[list[float]]]:
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS))
    return [c[0].token_ids for c in out], [c[0].logprobs for c in out]


@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_greedy_generations_equal_the_hf_merged_model_after_every_sync(lora_sync):
    torch.manual_seed(0)
    policy = add_lora(load_policy(TINY_RANDOM), LoRAConfig(r=8, alpha=16.0, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 at the start would make the adapter invisible: give it weight
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    tokenizer = load_tokenizer(TINY_RANDOM)
    engine = VLLMEngine(max_model_len=256, kv_cache_gib=0.25, enforce_eager=True, dtype="float32", lora_sync=lora_sync)
    engine.bind(policy, tokenizer, [])  # no end-of-turn ids: both sides generate NEW_TOKENS tokens
    try:
        base_ids = engine_greedy(engine)[0]
        for step in (1, 2):
            expected_ids, expected_lps = merged_greedy(policy)
            got_ids, got_lps = engine_greedy(engine)
            assert got_ids == expected_ids, f"{lora_sync}, sync {step}"
            for got, expected in zip(got_lps, expected_lps):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=LOGPROB_ATOL, rtol=0)
            if lora_sync == "adapter":  # one adapter registered at a time, a new id per sync
                assert engine.llm.llm_engine.list_loras() == {engine._lora_request.lora_int_id}
            optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=5.0)
            ids = torch.tensor([PROMPTS[0] + [77, 78, 79, 80] * 4])
            policy(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            engine.on_policy_update(step)
            engine.sync_weights()
        assert engine_greedy(engine)[0] == merged_greedy(policy)[0] != base_ids  # the steps changed the output
        assert engine.syncs == 3  # creation + one per step
    finally:
        engine.close()
