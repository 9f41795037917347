"""Faults cost an episode or a step, never the run: hung environments, overlong prompts, a request the engine
raises on, NaN losses; a dead engine stops the run with an error naming it."""

from __future__ import annotations

import json
import time

import pytest
import torch

from r3l_lightning.cli import cli_main
from r3l_lightning.engines.base import EngineDeadError, SamplingParams
from r3l_lightning.envs.base import StepResult, Task
from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, run_episodes, start_episode
from r3l_lightning.models import TINY_RANDOM, load_policy
from scripted import GuessEnv, GuessTasks, ScriptedEngine
from test_cli import SMOKE
from test_explorer import REFLECTION


class HangingEnv(GuessEnv):
    step_timeout_s = 0.3

    def make_episode(self, task):
        episode = super().make_episode(task)
        original = episode.step

        def slow_step(action):
            if action.strip() == "hang":
                time.sleep(5)
            return original(action)

        episode.step = slow_step
        return episode


def _run(env, engine, chat, n=2):
    counters = RolloutCounters()
    ctx = RolloutContext(env, engine, chat)
    states = [start_episode(ctx, GuessTasks(1)[0], counters) for _ in range(n)]
    run_episodes(ctx, states, SamplingParams(), counters)
    return states, counters


def test_a_hung_environment_step_ends_only_that_episode(tiny_chat):
    answers = iter(["hang", "apple"])
    engine = ScriptedEngine(lambda p: next(answers), tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    start = time.perf_counter()
    states, counters = _run(HangingEnv(max_turns=1), engine, tiny_chat)
    assert time.perf_counter() - start < 3
    assert [s.trajectory.reward for s in states] == [0.0, 1.0]
    assert "step_timeout_s" in states[0].trajectory.feedback
    assert counters.counts["env_errors"] == 1


class ReportingEnv(GuessEnv):
    """A backend failure the environment catches itself: done, reward 0, ``info["error"]``."""

    def make_episode(self, task):
        episode = super().make_episode(task)
        episode.step = lambda action: StepResult("server unreachable", 0.0, True, {"error": "connection refused"})
        return episode


def test_an_error_the_environment_reports_is_counted_and_marks_the_trajectory(tiny_chat):
    engine = ScriptedEngine(lambda p: "apple", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    states, counters = _run(ReportingEnv(max_turns=3), engine, tiny_chat, n=2)
    assert [s.trajectory.reward for s in states] == [0.0, 0.0]
    assert [s.trajectory.info["error"] for s in states] == ["connection refused"] * 2  # no reflect-retry on these
    assert counters.counts["env_errors"] == 2


def test_a_prompt_beyond_the_engine_context_ends_the_episode_with_feedback(tiny_chat):
    class ShortContext(ScriptedEngine):
        def max_context(self):
            return 300

    engine = ShortContext(lambda p: "pear " * 10, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    states, counters = _run(GuessEnv(max_turns=5), engine, tiny_chat, n=1)
    (state,) = states
    assert state.done and state.trajectory.reward == 0.0
    assert "exceeded the model context" in state.trajectory.feedback
    assert counters.counts["context_overflows"] == 1
    assert 0 < state.turns < 5


def test_a_reflection_prompt_beyond_the_engine_context_is_counted_and_skipped(tiny_chat):
    """A base trajectory too long to reflect on within the context gets no reflection (and so no retry); the
    others are reflected on as usual."""
    from r3l_lightning.explore import R3LExplorer

    class ShortContext(ScriptedEngine):
        def max_context(self):
            return 525  # the default reflection prompt is 291 tokens of it

    def script(prompt: str) -> str:
        if "Write the JSON diagnosis" in prompt:
            return json.dumps(REFLECTION)  # a valid report: failure, retry from turn 1
        return "pear " * 20 if "of long" in prompt else "pear"  # a base or retry turn: a long or a short wrong guess

    class NamedGuessEnv(GuessEnv):  # the first observation names the task
        def make_episode(self, task):
            episode = super().make_episode(task)
            episode.reset = lambda: f"Guess the secret word of {task.task_id}."
            return episode

    engine = ShortContext(script, tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    ctx = RolloutContext(NamedGuessEnv(max_turns=3), engine, tiny_chat)
    explorer = R3LExplorer(group_size=2, max_new_tokens=64, reflection_max_new_tokens=64, reflection_decoding="free")
    tasks = [Task("long", {"rewards": {"apple": 1.0}}), Task("short", {"rewards": {"apple": 1.0}})]
    result = explorer.explore(tasks, ctx)
    # short task: 3 turns of "pear" fit 525 tokens with the 64-token reflection budget; long task: 3 × 20 words do not
    assert result.stats["reflection_context_overflows"] == 1
    assert result.stats["reflections"] == 1 and result.stats["retries"] == 1


def test_non_finite_loss_skips_the_step_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(SMOKE), "--trainer.max_epochs", "1", "--trainer.logger", "false",
                    "--trainer.enable_checkpointing", "false", "--data.explorer", "scripted.NaNExplorer",
                    "--data.explorer.init_args.group_size", "2", "--data.explorer.init_args.max_new_tokens", "4",
                    "--trainer.callbacks", "[{class_path: r3l_lightning.callbacks.ExplorationCallback}]"])
    assert cli.trainer.current_epoch == 1
    assert cli.model.skipped_steps == 2  # both steps of the epoch
    initial = load_policy(TINY_RANDOM).state_dict()
    trained = cli.model.policy.state_dict()
    assert all(torch.equal(trained[k], initial[k]) for k in initial)


class FlakyEngine(ScriptedEngine):
    """Raises on any call whose prompts include one naming ``poison``; ``dead`` raises on every call."""

    def __init__(self, *args, dead: bool = False) -> None:
        super().__init__(*args)
        self.dead = dead

    def generate(self, prompts, params, constraints=None):
        if self.dead or any("poison" in self.tokenizer.decode(p) for p in prompts):
            raise RuntimeError("request failed in the engine")
        return super().generate(prompts, params, constraints)


class NamedGuessEnv(GuessEnv):
    def make_episode(self, task):
        episode = super().make_episode(task)
        episode.reset = lambda: f"Guess the secret word of {task.task_id}."
        return episode


def _run_tasks(engine, chat, task_ids):
    counters = RolloutCounters()
    ctx = RolloutContext(NamedGuessEnv(max_turns=1), engine, chat)
    states = [start_episode(ctx, Task(t, {"rewards": {"apple": 1.0}}), counters) for t in task_ids]
    run_episodes(ctx, states, SamplingParams(), counters)
    return states, counters


def test_a_request_the_engine_raises_on_costs_its_episode_only(tiny_chat):
    engine = FlakyEngine(lambda p: "apple", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id)
    states, counters = _run_tasks(engine, tiny_chat, ["a", "poison", "b"])
    assert [s.trajectory.reward for s in states] == [1.0, 0.0, 1.0]
    assert "request failed in the engine" in states[1].trajectory.info["error"]
    assert counters.counts["engine_errors"] == 1 and counters.counts["env_errors"] == 0
    assert engine.calls == [1, 1]  # the batch of 3 raised; alone, "a" and "b" were answered, "poison" raised


def test_an_engine_that_raises_on_every_request_stops_the_run_naming_it(tiny_chat):
    engine = FlakyEngine(lambda p: "apple", tiny_chat.tokenizer, tiny_chat.tokenizer.eos_token_id, dead=True)
    with pytest.raises(EngineDeadError, match=r"rollout engine FlakyEngine raised on each of 2 requests.*"
                                              r"--ckpt_path last"):
        _run_tasks(engine, tiny_chat, ["a", "b"])


def test_vllms_engine_dead_error_becomes_one_naming_the_vllm_engine(tiny_chat):
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

    from r3l_lightning.engines.vllm import VLLMEngine

    class DeadLLM:
        def generate(self, *args, **kwargs):
            raise VLLMEngineDeadError()

    engine = VLLMEngine()
    engine.bind(load_policy(TINY_RANDOM), tiny_chat.tokenizer, [tiny_chat.tokenizer.eos_token_id])
    engine._engine = lambda: DeadLLM()
    engine._wake_kv_cache = lambda: None
    engine._weights_asleep = False
    with pytest.raises(EngineDeadError, match="VLLMEngine: the vLLM engine core process died during generate"):
        _run_tasks(engine, tiny_chat, ["a", "b"])
