"""Shared fixtures: the tiny random model (built once from the embedded SmolLM2 tokenizer/config)."""

from __future__ import annotations

import pytest

from r3l_lightning.models import TINY_RANDOM, eos_token_ids, load_policy, load_tokenizer
from r3l_lightning.trajectory import ChatTokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return load_tokenizer(TINY_RANDOM)


@pytest.fixture(scope="session")
def tiny_chat(tiny_tokenizer):
    return ChatTokenizer(tiny_tokenizer, [tiny_tokenizer.eos_token_id])


@pytest.fixture()
def tiny_policy():
    return load_policy(TINY_RANDOM)


@pytest.fixture(scope="session")
def tiny_eos(tiny_tokenizer):
    return eos_token_ids(load_policy(TINY_RANDOM), tiny_tokenizer)
