"""Countdown: seeded solvable tasks, safe equation checking, attempt limits, replay restore."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from r3l_lightning.envs.countdown import CountdownEnv, CountdownTasks, InvalidEquation, evaluate_expression


def solvable(numbers: list[int], target: int) -> bool:
    """Brute force: every order, every operation, left-to-right and pairwise groupings."""
    def values(nums):
        if len(nums) == 1:
            yield Fraction(nums[0])
            return
        for i in range(1, len(nums)):
            for a in values(nums[:i]):
                for b in values(nums[i:]):
                    yield from (a + b, a - b, a * b)
                    if b != 0:
                        yield a / b
    return any(v == target for perm in itertools.permutations(numbers) for v in values(list(perm)))


def test_tasks_are_deterministic_sized_and_solvable():
    tasks = CountdownTasks(size=50, seed=3)
    again = CountdownTasks(size=50, seed=3)
    other = CountdownTasks(size=50, seed=4)
    assert [tasks[i] for i in range(50)] == [again[i] for i in range(50)]
    assert [tasks[i].payload for i in range(50)] != [other[i].payload for i in range(50)]
    for i in range(50):
        p = tasks[i].payload
        assert 3 <= len(p["numbers"]) <= 4 and 1 <= p["target"] <= 100
        assert solvable(p["numbers"], p["target"]), p
    with pytest.raises(IndexError):
        tasks[50]


@pytest.mark.parametrize(
    "expression, value, numbers",
    [("(3 + 5) * 2", 16, [3, 5, 2]), ("10 / 4", Fraction(5, 2), [10, 4]), ("7-2*3", 1, [7, 2, 3]),
     ("8 × 2 ÷ 4", 4, [8, 2, 4])],
)
def test_expressions_are_evaluated_exactly(expression, value, numbers):
    assert evaluate_expression(expression) == (value, numbers)


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('echo hi')", "x + 1", "abs(-3)", "2 ** 10", "(1).real", "3 / 0", "1 +",
     "9" * 11 + " * " + "9" * 11, "1 + " * 100 + "1", "2.5 + 1", "-3 + 5"],
)
def test_unsafe_or_invalid_expressions_are_rejected_without_running_them(expression):
    with pytest.raises(InvalidEquation):
        evaluate_expression(expression)


@pytest.fixture()
def episode():
    env = CountdownEnv(max_attempts=3)
    from r3l_lightning.envs.base import Task
    ep = env.make_episode(Task("t", {"numbers": [3, 5, 2], "target": 16}))
    ep.reset()
    return ep


def test_correct_answer_with_trailing_equals_scores_one(episode):
    result = episode.step("<think>3+5=8, 8*2=16</think><answer>(3 + 5) * 2 = 16</answer>")
    assert (result.reward, result.done, result.info["outcome"]) == (1.0, True, "correct")
    assert "attempt 1" in episode.feedback()


@pytest.mark.parametrize(
    "answer, outcome, text",
    [("3 + 5 + 2", "incorrect", "evaluates to 10"), ("(3 + 5) * 2 * 2", "incorrect", "exactly once"),
     ("(3 + 5) * 1", "incorrect", "exactly once"), ("3 / (5 - 5) + 2", "invalid_equation", "division by zero"),
     ("__import__('os')", "invalid_equation", "only integers")],
)
def test_wrong_answers_get_feedback_and_another_attempt(episode, answer, outcome, text):
    result = episode.step(f"<answer>{answer}</answer>")
    assert (result.reward, result.done, result.info["outcome"]) == (0.0, False, outcome)
    assert text in result.observation and "Try again (2 attempts left)" in result.observation


def test_three_wrong_attempts_end_with_zero_and_second_try_can_win(episode):
    for attempt in range(3):
        result = episode.step("<answer>3 + 5 + 2</answer>")
    assert (result.reward, result.done) == (0.0, True)
    assert "Not solved after 3 attempt(s)" in episode.feedback()
    episode.reset()
    assert not episode.step("<answer>3 * 5 + 2</answer>").done
    result = episode.step("<answer>2 * (5 + 3)</answer>")
    assert (result.reward, result.done, result.info["attempt"]) == (1.0, True, 2)


def test_invalid_format_ends_the_episode_or_costs_an_attempt():
    from r3l_lightning.envs.base import Task
    task = Task("t", {"numbers": [3, 5, 2], "target": 16})
    strict = CountdownEnv().make_episode(task)
    strict.reset()
    result = strict.step("the answer is (3+5)*2")
    assert (result.reward, result.done, result.info["outcome"]) == (0.0, True, "invalid_format")
    lenient = CountdownEnv(end_on_invalid_format=False).make_episode(task)
    lenient.reset()
    assert not lenient.step("no tags").done
    assert lenient.step("<answer>(3+5)*2</answer>").reward == 1.0


def test_restore_by_replay_reproduces_the_observations(episode):
    obs = [episode.reset()]
    obs.append(episode.step("<answer>3 + 5 + 2</answer>").observation)
    actions = ["<answer>3 + 5 + 2</answer>"]
    fresh = CountdownEnv().make_episode(episode.task)
    assert fresh.restore(actions, obs)
    assert fresh.attempt == 1
    assert not fresh.restore(actions, [obs[0], "something else"])
