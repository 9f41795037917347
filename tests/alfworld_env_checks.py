"""ALFWorld on the real TextWorld PDDL engine (skipped when alfworld / textworld[pddl] are missing).

Uses games generated offline (NOT the official ALFWorld split) in a temporary R3L_CACHE.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time

import pytest

from r3l_lightning.envs.alfworld import alfworld_available

pytestmark = pytest.mark.skipif(not alfworld_available(), reason="alfworld / textworld[pddl] not installed")

SIX = ["pick_and_place", "pick_clean_then_place", "pick_heat_then_place", "pick_cool_then_place",
       "look_at_obj_in_light", "pick_two_obj_and_place"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("r3l_cache")
    mp.setenv("R3L_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def train_tasks(cache):
    from r3l_lightning.envs.alfworld import AlfWorldTasks

    t0 = time.perf_counter()
    tasks = AlfWorldTasks(source="generated", split="train", num_games=6, seed=0)
    elapsed = time.perf_counter() - t0
    print(f"\ngeneration: {elapsed / len(tasks):.2f} s/game ({len(tasks)} games)", file=sys.stderr)
    return tasks


def _walkthrough(task):
    return json.loads(open(task.payload["game_file"]).read())["walkthrough"]


def test_disclaimer_constant():
    from r3l_lightning.envs import alfworld

    assert "NOT the official" in alfworld.GENERATED_GAMES_DISCLAIMER
    assert "NOT the official ALFWorld benchmark split" in alfworld.__doc__


def test_generated_cache_layout(train_tasks, cache):
    assert len(train_tasks) == 6
    assert train_tasks.disclaimer and "NOT the official" in train_tasks.disclaimer
    assert sorted(train_tasks[i].payload["task_type"] for i in range(6)) == sorted(SIX)
    root = cache / "alfworld" / "train-0"
    games = sorted(root.glob("train/*/*/game.tw-pddl"))
    assert len(games) == 6
    for game in games:
        data = json.loads(game.read_text())
        assert {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"} <= set(data)
        assert data["solvable"] is True
        assert (game.parent / "traj_data.json").exists()
    assert not list((cache / "alfworld").glob(".tmp-*"))  # written atomically, no leftovers


def test_scripted_expert_wins_every_task_type(train_tasks):
    from r3l_lightning.envs.alfworld import AlfWorldEnv

    env = AlfWorldEnv()
    assert "ONE action" in env.system_prompt()
    step_times = []
    for i in range(len(train_tasks)):
        task = train_tasks[i]
        episode = env.make_episode(task)
        obs = episode.reset()
        assert "Your task is to:" in obs and "Admissible actions:" in obs
        plan = _walkthrough(task)
        for k, action in enumerate(plan):
            t0 = time.perf_counter()
            result = episode.step(f"{action}\nbecause it is next")  # only the first line counts
            step_times.append(time.perf_counter() - t0)
            last = k == len(plan) - 1
            assert result.done == last, (task.task_id, k, result.observation)
            assert result.reward == (1.0 if last else 0.0)
        assert result.info["outcome"] == "success"
        assert episode.feedback().startswith("Success")
        episode.close()
    print(f"\nstep: {1000 * sum(step_times) / len(step_times):.1f} ms/step", file=sys.stderr)


def test_invalid_action_ends_episode(train_tasks):
    from r3l_lightning.envs.alfworld import AlfWorldEnv

    episode = AlfWorldEnv().make_episode(train_tasks[0])
    episode.reset()
    result = episode.step("\n\n  fly to the moon  \n")
    assert result.done and result.reward == 0.0 and result.info["invalid_action"]
    assert "fly to the moon" in result.observation and "Invalid action" in result.observation
    assert "invalid action" in episode.feedback()
    episode.close()

    lenient = AlfWorldEnv(end_on_invalid_action=False, max_turns=2).make_episode(train_tasks[0])
    lenient.reset()
    result = lenient.step("fly to the moon")
    assert not result.done and result.observation.startswith("Nothing happens.")
    result = lenient.step("look")
    assert result.done and result.reward == 0.0 and result.info["outcome"] == "turn limit"
    assert "within 2 steps" in lenient.feedback()
    lenient.close()


def test_replay_restores_observations(train_tasks):
    from r3l_lightning.envs.alfworld import AlfWorldEnv

    env = AlfWorldEnv()
    task = train_tasks[5]  # pick_two: longest plan
    plan = _walkthrough(task)
    k = 3
    first = env.make_episode(task)
    observations = [first.reset()] + [first.step(a).observation for a in plan[:k]]
    nxt = first.step(plan[k]).observation
    first.close()

    second = env.make_episode(task)
    assert second.restore(plan[:k], observations)
    assert second.step(plan[k]).observation == nxt
    assert not second.restore(plan[:k], observations[:-1] + ["something else"])
    second.close()


def test_directory_loader_official_layout(train_tasks, cache, tmp_path):
    from r3l_lightning.envs.alfworld import AlfWorldTasks

    root = cache / "alfworld" / "train-0"
    tasks = AlfWorldTasks(source="directory", data_dir=str(root), split="train", num_games=0)
    assert len(tasks) == 6 and tasks.disclaimer is None
    assert {tasks[i].payload["game_file"] for i in range(6)} == {train_tasks[i].payload["game_file"] for i in range(6)}
    only = AlfWorldTasks(source="directory", data_dir=str(root), split="train", num_games=0,
                         task_types=["pick_heat_then_place_in_recep"])
    assert len(only) == 1 and only[0].payload["task_type"] == "pick_heat_then_place"
    assert len(AlfWorldTasks(source="directory", data_dir=str(root), split="train", num_games=2)) == 2

    # An official-looking copy: folders ALFWorld skips (movable / unsolvable) are skipped here too.
    official = tmp_path / "json_2.1.1" / "valid_seen"
    src = train_tasks[0].payload["game_file"]
    for folder, solvable in (("pick_and_place_simple-Mug-None-Desk-308/trial_T2019", True),
                             ("pick_and_place_with_movable_recep-Mug-Cup-Desk-308/trial_T1", True),
                             ("pick_and_place_simple-Pen-None-Desk-308/trial_T2", False)):
        (official / folder).mkdir(parents=True)
        data = json.loads(open(src).read())
        data["solvable"] = solvable
        (official / folder / "game.tw-pddl").write_text(json.dumps(data))
    valid = AlfWorldTasks(source="directory", data_dir=str(tmp_path / "json_2.1.1"), split="valid_seen")
    assert len(valid) == 1 and valid[0].task_id.endswith("Desk-308/trial_T2019")
    assert valid[0].payload["task_type"] == "pick_and_place"

    with pytest.raises(FileNotFoundError, match="game.tw-pddl") as err:
        AlfWorldTasks(source="directory", data_dir=str(tmp_path / "nope"), split="train")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no playable ALFWorld games"):
        AlfWorldTasks(source="directory", data_dir=str(tmp_path / "empty"), split="train")
    shutil.rmtree(tmp_path / "json_2.1.1")


def test_train_and_eval_seeds_are_disjoint(train_tasks, cache):
    from r3l_lightning.envs.alfworld import AlfWorldTasks

    argv = list(sys.argv)
    evals = AlfWorldTasks(source="generated", split="valid_seen", num_games=3, seed=1,
                          task_types=["pick_and_place", "look_at_obj_in_light", "pick_two_obj_and_place"])
    assert sys.argv == argv  # fast-downward's translator must not leak into sys.argv
    assert sorted({evals[i].payload["task_type"] for i in range(3)}) == sorted(
        ["pick_and_place", "look_at_obj_in_light", "pick_two_obj_and_place"])

    def problems(tasks):
        return {hashlib.sha256(json.loads(open(tasks[i].payload["game_file"]).read())["pddl_problem"]
                               .split("(:objects", 1)[1].encode()).hexdigest() for i in range(len(tasks))}

    assert problems(evals).isdisjoint(problems(train_tasks))
    assert {evals[i].task_id for i in range(3)}.isdisjoint({train_tasks[i].task_id for i in range(6)})
    # Cached: a second request does not regenerate and returns the same games.
    again = AlfWorldTasks(source="generated", split="train", num_games=6, seed=0)
    assert [again[i].task_id for i in range(6)] == [train_tasks[i].task_id for i in range(6)]


def test_grounded_action_is_constrained_to_the_admissible_commands_and_the_reference_follows_the_plan(train_tasks):
    """A scripted agent that follows the walkthrough for 2 steps, then takes an admissible command off the plan:
    run_episodes records the engine's admissible commands at every turn, the grounded field at step k admits
    exactly those, and the reference report names step 2 and the plan's command there."""
    import json as _json

    from r3l_lightning.engines.base import Completion, RolloutEngine, SamplingParams
    from r3l_lightning.envs.alfworld import AlfWorldEnv
    from r3l_lightning.explore.episodes import RolloutContext, RolloutCounters, run_episodes, start_episode
    from r3l_lightning.explore.reflection import parse_reflection, report_schema
    from r3l_lightning.models import TINY_RANDOM, load_tokenizer
    from r3l_lightning.trajectory import ChatTokenizer

    task = train_tasks[5]
    plan = _walkthrough(task)
    tokenizer = load_tokenizer(TINY_RANDOM)
    chat = ChatTokenizer(tokenizer, [tokenizer.eos_token_id])
    env = AlfWorldEnv(max_turns=3)

    class Agent(RolloutEngine):  # plan[0], plan[1], then the alphabetically first admissible command off the plan
        def generate(self, prompts, params, constraints=None):
            text = tokenizer.decode(prompts[0])
            turn = text.count("<|im_start|>assistant") - 1
            if turn < 2:
                action = plan[turn]
            else:
                listed = text.rsplit("Admissible actions: ", 1)[1].split("<|im_end|>")[0].split(", ")
                action = sorted(a for a in listed if a != plan[2])[0]
            ids = tokenizer(action, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            return [[Completion(ids, None, "stop")]]

    ctx = RolloutContext(env, Agent(), chat)
    state = start_episode(ctx, task, RolloutCounters())
    run_episodes(ctx, [state], SamplingParams(), RolloutCounters())
    trajectory = state.trajectory
    listed = trajectory.info["admissible"]
    assert len(listed) == 3 and plan[0] in listed[0] and plan[2] in listed[2]
    (field,) = env.grounded_fields(task, trajectory)
    schema = report_schema(3, trajectory.reward, grounded=[field])
    branches = {b["properties"]["retry_from_step"]["enum"][0]: b["properties"]["corrected_action"]["enum"]
                for b in schema["anyOf"]}
    assert branches == {k: listed[k] for k in range(3)}  # one branch per pivot, its step's admissible commands
    report = env.reference_report(task, trajectory)
    assert report["retry_from_step"] == 2 and report["corrected_action"] == plan[2]
    reflection, reason = parse_reflection(_json.dumps(report), 3, [field])
    assert reason == "" and reflection.grounded == {"corrected_action": plan[2]}
    off_plan = dict(report, corrected_action="fly to the moon")  # not admissible at step 2
    assert parse_reflection(_json.dumps(off_plan), 3, [field]) == (None, "grounded_value_not_admissible")
