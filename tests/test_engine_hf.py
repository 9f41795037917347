"""HFEngine returns exactly the ids a manual forward pass would sample and their processed logprobs."""

from __future__ import annotations

import pytest
import torch

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.hf import HFEngine


@pytest.fixture()
def engine(tiny_policy, tiny_tokenizer, tiny_eos):
    e = HFEngine(max_batch_size=4)
    e.bind(tiny_policy, tiny_tokenizer, tiny_eos)
    return e


def manual_logprobs(policy, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


PROMPTS = [[1, 9, 42, 7, 300], [1, 55], [1, 8, 8, 8, 8, 8, 8, 900]]  # different lengths: left padding


def test_greedy_ids_and_logprobs_match_a_manual_forward(engine, tiny_policy):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, n=2))
    assert [len(o) for o in out] == [2, 2, 2]
    for prompt, (first, second) in zip(PROMPTS, out):
        assert first.token_ids == second.token_ids
        ids = list(prompt)
        for token, lp in zip(first.token_ids, first.logprobs):
            with torch.no_grad():
                logits = tiny_policy(input_ids=torch.tensor([ids])).logits[0, -1].float()
            assert token == int(logits.argmax())  # greedy: the manual argmax, step by step
            assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-4)
            ids.append(token)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_processed_logprobs(engine, tiny_policy, temperature):
    out = engine.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=5, n=3, seed=0))
    for prompt, completions in zip(PROMPTS, out):
        assert len(completions) == 3
        for c in completions:
            expected = manual_logprobs(tiny_policy, prompt, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_stops_at_eos_and_reports_finish_reason(tiny_policy, tiny_tokenizer):
    eos = 2
    with torch.no_grad():
        greedy_first = int(tiny_policy(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].argmax())
    e = HFEngine()
    e.bind(tiny_policy, tiny_tokenizer, [greedy_first])  # make the first greedy token the end-of-turn id
    (c,), = e.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert c.token_ids == [greedy_first] and c.finish_reason == "stop"
    e.bind(tiny_policy, tiny_tokenizer, [eos])
    (c,), = e.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=8))
    if eos not in c.token_ids:
        assert c.finish_reason == "length" and len(c.token_ids) == 8


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=123)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [[c.token_ids for c in o] for o in a] == [[c.token_ids for c in o] for o in b]


def test_chunks_larger_batches(engine):
    out = engine.generate(PROMPTS * 3, SamplingParams(temperature=1.0, max_new_tokens=3, n=2, seed=1))
    assert len(out) == 9 and all(len(o) == 2 for o in out)
