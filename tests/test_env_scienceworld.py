"""ScienceWorld environment against the real simulator (scienceworld==1.2.3 + Java 17).

Tests that start a JVM are skipped without ``java`` or the ``scienceworld`` package. One environment
(one JVM, ``max_jvms=1``) is shared by the module to keep the wall time down.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import time

import pytest

from r3l_lightning.envs.base import Task
from r3l_lightning.envs.scienceworld import (
    ACTION_TEMPLATES,
    ScienceWorldEnv,
    ScienceWorldTasks,
    canonical_observation,
    is_invalid_response,
    parse_action,
)

needs_sim = pytest.mark.skipif(
    shutil.which("java") is None or importlib.util.find_spec("scienceworld") is None,
    reason="needs Java and `pip install scienceworld==1.2.3`",
)

# Tasks whose gold path is short and quick to generate.
GOLD_TASKS = ["find-non-living-thing", "lifespan-longest-lived", "lifespan-shortest-lived", "find-animal"]


def task(name: str, variation: int = 3) -> Task:
    return Task(f"sciworld-{name}-{variation}", {"task_name": name, "variation": variation, "simplification": "easy"})


@pytest.fixture(scope="module")
def env():
    environment = ScienceWorldEnv(max_jvms=1)
    yield environment
    environment.close()


@pytest.fixture()
def flags(env):
    """Restore the env's per-episode flags after a test that changes them."""
    saved = (env.end_on_invalid_action, env.show_valid_actions, env.max_turns)
    yield env
    env.end_on_invalid_action, env.show_valid_actions, env.max_turns = saved


# ---------------------------------------------------------------------------------------- no JVM


def test_parse_action_first_nonempty_line() -> None:
    assert parse_action("\n\n  > Go to  Kitchen.\nfocus on axe") == "go to kitchen"
    assert parse_action('"open door to kitchen"') == "open door to kitchen"
    assert parse_action("Action: `pick up thermometer`") == "pick up thermometer"
    assert parse_action("  \n \t\n") is None
    assert parse_action("") is None


def test_invalid_response_and_canonical_form() -> None:
    assert is_invalid_response("No known action matches that input.")
    assert is_invalid_response("Unknown action.  Type 'help' for a list of actions")
    assert not is_invalid_response("The door is already open.")
    a = "In it, you see: \n\ta wood cup (containing red paint)\n\ta wood cup (containing blue paint)"
    b = "In it, you see: \n\ta wood cup (containing blue paint)\n\ta wood cup (containing red paint)"
    assert canonical_observation(a) == canonical_observation(b)
    assert canonical_observation(a) != canonical_observation(a.replace("red", "green"))


# ---------------------------------------------------------------------------------------- with JVM


@needs_sim
def test_task_enumeration_deterministic_and_filtered() -> None:
    sizes = {split: len(ScienceWorldTasks(split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 3592, "dev": 1796, "test": 1819}
    a, b = ScienceWorldTasks("dev", seed=1), ScienceWorldTasks("dev", seed=1)
    assert [a[i].task_id for i in range(len(a))] == [b[i].task_id for i in range(len(b))]
    c = ScienceWorldTasks("dev", seed=2)
    assert [a[i].task_id for i in range(50)] != [c[i].task_id for i in range(50)]
    assert sorted(a[i].task_id for i in range(len(a))) == sorted(c[i].task_id for i in range(len(c)))

    boil = ScienceWorldTasks("test", task_names=["boil", "melt"], seed=0)
    assert len(boil) == 18  # 9 test variations each
    assert {boil[i].payload["task_name"] for i in range(len(boil))} == {"boil", "melt"}
    assert boil[0].payload["simplification"] == "easy"
    assert all(boil[i].payload["variation"] >= 21 for i in range(len(boil)))  # test variations of boil/melt
    assert len(ScienceWorldTasks("train", task_names=["boil"], limit=5)) == 5
    with pytest.raises(ValueError, match="valid names"):
        ScienceWorldTasks("train", task_names=["no-such-task"])


@needs_sim
def test_system_prompt_covers_simulator_templates(env) -> None:
    jvm, session = env._pool.lease()
    try:
        jvm.call("load", session, "boil", 0, "", False)  # no simplification: electrical actions present
        simulator = {str(a) for a in jvm.call("getPossibleActions", session)}
    finally:
        env._pool.give_back(jvm, session)
    ours = {t.replace("LOC", "OBJ").replace("go to", "go").replace("teleport to", "teleport") for t in ACTION_TEMPLATES}
    assert simulator - {"reset task"} <= ours
    prompt = env.system_prompt()
    assert "ONE action" in prompt and "focus on OBJ" in prompt


@needs_sim
def test_gold_sequences_score_one(env) -> None:
    source = ScienceWorldTasks("test", task_names=GOLD_TASKS[:3], seed=0)
    seen = set()
    for i in range(len(source)):
        t = source[i]
        if t.payload["task_name"] in seen:
            continue
        seen.add(t.payload["task_name"])
        gold = env.gold_actions(t)
        episode = env.make_episode(t)
        first = episode.reset()
        assert "Your task is" in first
        result = None
        for action in gold:
            result = episode.step(action)
            assert "invalid_action" not in result.info, (t.task_id, action, result.observation)
            if result.done:
                break
        assert result is not None and result.done, t.task_id
        assert result.reward == 1.0 and result.info["score"] == 100, (t.task_id, result)
        assert "completed" in episode.feedback() and "100/100" in episode.feedback()
        episode.close()
    assert len(seen) == 3


@needs_sim
def test_invalid_action_ends_episode_by_default(flags) -> None:
    env = flags
    episode = env.make_episode(task("find-living-thing", 1))
    episode.reset()
    result = episode.step("dance with the moon")
    assert result.done and result.reward == 0.0 and result.info["invalid_action"]
    assert "No known action" in result.observation
    assert "invalid" in episode.feedback() and "Final score" in episode.feedback()
    episode.close()

    empty = env.make_episode(task("find-living-thing", 1))
    empty.reset()
    assert empty.step("   \n").done
    empty.close()

    env.end_on_invalid_action = False
    episode = env.make_episode(task("find-living-thing", 1))
    episode.reset()
    result = episode.step("dance with the moon")
    assert not result.done and result.info["invalid_action"]
    assert "No known action" in result.observation
    result = episode.step("look around")
    assert not result.done and "invalid_action" not in result.info
    episode.close()


@needs_sim
def test_wrong_focus_fails_and_turn_limit_gives_partial_score(flags) -> None:
    env = flags
    episode = env.make_episode(task("find-living-thing", 1))
    episode.reset()
    result = episode.step("focus on air")  # air is not alive: the task fails
    assert result.done and result.reward == 0.0 and result.info["score"] < 0
    episode.close()

    env.max_turns = 2
    episode = env.make_episode(task("find-non-living-thing", 3))
    episode.reset()
    assert not episode.step("open door to kitchen").done
    result = episode.step("go to kitchen")
    assert result.done and result.reward == result.info["score"] / 100 > 0
    assert "turn limit" in episode.feedback()
    episode.close()


@needs_sim
def test_show_valid_actions_and_ambiguity(flags) -> None:
    env = flags
    env.show_valid_actions = True
    episode = env.make_episode(task("find-non-living-thing", 3))
    first = episode.reset()
    assert "Valid actions:" in first and "look around" in first.split("Valid actions:")[1]
    result = episode.step("open door")  # ambiguous: three doors, menu order varies between runs
    assert not result.done and result.info["ambiguity_resolved"] == "open door between foundry and outside"
    assert "Valid actions:" in result.observation
    episode.close()


@needs_sim
def test_killed_jvm_costs_one_episode(env) -> None:
    episode = env.make_episode(task("find-non-living-thing", 3))
    episode.reset()
    assert episode.step("look around").done is False
    (pid,) = env.jvm_pids()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    result = episode.step("go to kitchen")
    assert result.done and result.reward == 0.0 and "error" in result.info
    assert "simulator failed" in episode.feedback()
    episode.close()

    after = env.make_episode(task("lifespan-longest-lived", 3))
    assert "Your task is" in after.reset()
    assert not after.step("look around").done
    assert env.jvm_pids() and env.jvm_pids()[0] != pid
    after.close()


@needs_sim
def test_restore_by_replay_reproduces_turn_k(env) -> None:
    t = task("find-non-living-thing", 3)
    actions = ["open door to kitchen", "go to kitchen", "look around", "pick up thermometer", "look around"]
    base = env.make_episode(t)
    observations = [base.reset()]
    for action in actions:
        observations.append(base.step(action).observation)
    base.close()

    k = 3
    retry = env.make_episode(t)
    assert retry.restore(actions[:k], observations[: k + 1])
    assert retry.turns == k
    nxt = retry.step(actions[k])
    assert canonical_observation(nxt.observation) == canonical_observation(observations[k + 1])
    retry.close()

    wrong = env.make_episode(t)
    assert not wrong.restore(actions[:k], observations[:k] + ["You are on the moon."])
    wrong.close()


@needs_sim
def test_the_reference_report_follows_the_gold_path_to_the_first_wrong_step(env) -> None:
    """An agent that takes the first two gold actions, then one off the path: the reference reflector names
    step 2 and the gold action there; a retry told that action and continuing on the gold path scores 1."""
    from r3l_lightning.explore.reflection import parse_reflection, report_schema
    from r3l_lightning.trajectory import Message, Trajectory

    t = task(GOLD_TASKS[0])
    gold = env.gold_actions(t)
    episode = env.make_episode(t)
    observations, actions = [episode.reset()], []
    for action in gold[:2] + ["look at the ceiling"]:
        result = episode.step(action)
        actions.append(action)
        observations.append(result.observation)
        if result.done:
            break
    episode.close()
    messages = [Message("system", env.system_prompt())]
    for obs, act in zip(observations, actions):
        messages += [Message("user", obs), Message("assistant", act)]
    trajectory = Trajectory(messages, reward=0.0, actions=actions, observations=observations[: len(actions)])
    report = env.reference_report(t, trajectory)
    assert report["retry_from_step"] == 2 and report["corrected_action"] == gold[2]
    assert report["improvement_suggestion"].startswith(f"From step 2, act: {gold[2]}")
    # the report is a valid grounded report for this trajectory (template-pattern field: no listed actions)
    fields = env.grounded_fields(t, trajectory)
    assert parse_reflection(json.dumps(report), 3, fields)[1] == ""
    assert report_schema(3, 0.0, grounded=fields)["properties"]["corrected_action"]["pattern"]
    # the fix works: the first two actions replayed, then the gold path from step 2
    replay = env.make_episode(t)
    replay.reset()
    for action in gold:
        result = replay.step(action)
        if result.done:
            break
    replay.close()
    assert result.reward == 1.0
    # a completed trajectory needs no report
    assert env.reference_report(t, Trajectory(messages, reward=1.0, actions=actions)) is None
