"""Countdown: seeded solvable tasks, safe equation checking, attempt limits, replay restore."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from r3l_lightning.envs.answer_format import extract_answer
from r3l_lightning.envs.base import Task
from r3l_lightning.envs.countdown import CountdownEnv, CountdownTasks, InvalidEquation, evaluate_expression, solve


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
    assert tasks[7].task_id == "countdown-3-7" and CountdownTasks(size=50, seed=3)[7] == tasks[7]
    with pytest.raises(IndexError):
        tasks[50]


def test_difficulty_is_configurable():
    tasks = CountdownTasks(size=20, seed=0, min_numbers=2, max_numbers=2, max_value=5, max_target=10)
    for i in range(20):
        p = tasks[i].payload
        assert len(p["numbers"]) == 2 and max(p["numbers"]) <= 5 and 1 <= p["target"] <= 10
        assert solvable(p["numbers"], p["target"])


@pytest.mark.parametrize(
    "text, answer",
    [("<think>x</think><answer> 3 + 4 </answer>", "3 + 4"), ("<answer>1</answer> then <answer>2</answer>", "2"),
     ("<ANSWER>\n5\n</ANSWER>", "5"), ("< answer >6</ answer >", "6"), ("<answer>  </answer>", None),
     ("no tags", None), ("<answer>unclosed", None)],
)
def test_extract_answer_takes_the_last_non_empty_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "expression, value, numbers",
    [("(3 + 5) * 2", 16, [3, 5, 2]), ("10 / 4", Fraction(5, 2), [10, 4]), ("7-2*3", 1, [7, 2, 3]),
     ("8 × 2 ÷ 4", 4, [8, 2, 4]), ("(3 \\times 5) \\div 5", 3, [3, 5, 5])],
)
def test_expressions_are_evaluated_exactly(expression, value, numbers):
    assert evaluate_expression(expression) == (value, numbers)


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('echo hi')", "x + 1", "abs(-3)", "2 ** 10", "(1).real", "3 / 0", "1 +",
     "9" * 11 + " * " + "9" * 11, "99999 * 99999", "1 + " * 100 + "1", "2.5 + 1", "-3 + 5", "0x10 + 1",
     "1_0 + 2", "3 \x00+ 1", "[1, 2]", "1 if 2 else 3", "lambda: 1", "True + 1"],
)
def test_unsafe_or_invalid_expressions_are_rejected_without_running_them(expression):
    with pytest.raises(InvalidEquation):
        evaluate_expression(expression)


@pytest.fixture()
def episode():
    env = CountdownEnv(max_attempts=3)
    ep = env.make_episode(Task("t", {"numbers": [3, 5, 2], "target": 16}))
    ep.reset()
    return ep


def test_correct_answer_with_trailing_equals_scores_one(episode):
    result = episode.step("<think>3+5=8, 8*2=16</think><answer>(3 + 5) * 2 = 16</answer>")
    assert (result.reward, result.done, result.info["outcome"]) == (1.0, True, "correct")
    assert "attempt 1" in episode.feedback()


@pytest.mark.parametrize(
    "answer, outcome, text",
    [("3 + 5 + 2", "incorrect", "evaluates to 10"), ("(3 + 5) * 2 * 2", "incorrect", "uses [2] beyond"),
     ("(3 + 5) * 1 * 2", "incorrect", "uses [1] beyond"),
     # 8·2·2/2 = 16 HITS the target but uses 2 three times: only a count (not a set) of numbers rejects it
     ("(3 + 5) * 2 * 2 / 2", "incorrect", "uses [2, 2] beyond"), ("(3 + 13)", "incorrect", "does not use [2, 5]"),
     ("3 + 5 = 16", "incorrect", "evaluates to 8"), ("3 + 5 * 2 = 8 * 2", "invalid_equation", "not a valid"),
     ("3 / (5 - 5) + 2", "invalid_equation", "division by zero"),
     ("__import__('os')", "invalid_equation", "only integers")],
)
def test_wrong_answers_get_feedback_and_another_attempt(episode, answer, outcome, text):
    result = episode.step(f"<answer>{answer}</answer>")
    assert (result.reward, result.done, result.info["outcome"]) == (0.0, False, outcome)
    assert text in result.observation and "Try again (2 attempts left)" in result.observation


def test_three_wrong_attempts_end_with_zero_and_second_try_can_win(episode):
    for _ in range(3):
        result = episode.step("<answer>3 + 5 + 2</answer>")
    assert (result.reward, result.done) == (0.0, True)
    assert "Not solved after 3 attempt(s)" in episode.feedback()
    episode.reset()
    assert not episode.step("<answer>3 * 5 + 2</answer>").done
    result = episode.step("<answer>2 * (5 + 3)</answer>")
    assert (result.reward, result.done, result.info["attempt"]) == (1.0, True, 2)


def test_invalid_format_ends_the_episode_or_costs_an_attempt():
    task = Task("t", {"numbers": [3, 5, 2], "target": 16})
    strict = CountdownEnv().make_episode(task)
    strict.reset()
    result = strict.step("the answer is (3+5)*2")
    assert (result.reward, result.done, result.info["outcome"]) == (0.0, True, "invalid_format")
    lenient = CountdownEnv(end_on_invalid_format=False).make_episode(task)
    lenient.reset()
    first = lenient.step("no tags")
    assert not first.done and "Invalid format" in first.observation
    result = lenient.step("<answer>(3+5)*2</answer>")
    assert (result.reward, result.info["attempt"]) == (1.0, 2) and "attempt 2" in lenient.feedback()


def test_prompts_state_the_rules_numbers_and_target():
    env = CountdownEnv()
    assert "<answer>" in env.system_prompt() and "(3 + 5) * 2" in env.system_prompt() and env.max_turns == 3
    first = env.make_episode(Task("t", {"numbers": [3, 5, 2], "target": 16})).reset()
    assert "[3, 5, 2]" in first and "16" in first


def test_restore_by_replay_reproduces_the_observations(episode):
    obs = [episode.reset()]
    obs.append(episode.step("<answer>3 + 5 + 2</answer>").observation)
    actions = ["<answer>3 + 5 + 2</answer>"]
    fresh = CountdownEnv().make_episode(episode.task)
    assert fresh.restore(actions, obs)
    assert fresh.attempt == 1
    assert not fresh.restore(actions, [obs[0], "something else"])


def test_bounded_answer_grammar_allows_exactly_the_tasks_count_of_numbers():
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from r3l_lightning.envs.countdown import answer_grammar

    three = xgr.Grammar.from_ebnf(answer_grammar(3))
    for text in ("<answer>1 + 2 * 3</answer>", "<answer>(10 - 2) / 4</answer>", "<answer>7 * (2 + 9)</answer>"):
        assert accepts(three, text), text
    for text in ("<answer>1 + 2</answer>", "<answer>1 + 2 + 3 + 4</answer>", "<answer>(1) + 2 + 3</answer>",
                 "<answer>1 +2 * 3</answer>", "<answer>0 + 2 * 3</answer>"):
        assert not accepts(three, text), text
    assert accepts(xgr.Grammar.from_ebnf(answer_grammar(1)), "<answer>42</answer>")
    with pytest.raises(ValueError, match="at least one number"):
        answer_grammar(0)


def test_bound_operands_gives_each_task_its_own_grammar():
    from r3l_lightning.envs.countdown import ANSWER_GRAMMAR, answer_grammar

    env = CountdownEnv(response_format="answer", constrain_answer=True, bound_operands=True)
    two, four = Task("a", {"numbers": [3, 5], "target": 8}), Task("b", {"numbers": [1, 2, 3, 4], "target": 24})
    assert env.response_constraint(two).grammar == answer_grammar(2)
    assert env.response_constraint(four).grammar == answer_grammar(4)
    unbounded = CountdownEnv(response_format="answer", constrain_answer=True)
    assert unbounded.response_constraint(two).grammar == ANSWER_GRAMMAR
    assert CountdownEnv(response_format="answer").response_constraint(two) is None
    with pytest.raises(ValueError, match="constrain_answer: true"):
        CountdownEnv(response_format="answer", bound_operands=True)


def test_operands_from_task_lets_the_answer_write_only_the_tasks_numbers():
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string as accepts

    env = CountdownEnv(response_format="answer", constrain_answer=True, bound_operands=True, operands_from_task=True)
    grammar = xgr.Grammar.from_ebnf(env.response_constraint(Task("a", {"numbers": [9, 6], "target": 3})).grammar)
    for text in ("<answer>9 - 6</answer>", "<answer>6 * 9</answer>", "<answer>9 / 9</answer>"):
        assert accepts(grammar, text), text  # any operator, any order; a repeated number is left to the rules
    for text in ("<answer>9 - 3</answer>", "<answer>96 - 6</answer>", "<answer>9 - 6 - 6</answer>"):
        assert not accepts(grammar, text), text
    with pytest.raises(ValueError, match="bound_operands: true"):
        CountdownEnv(response_format="answer", constrain_answer=True, operands_from_task=True)


def test_balanced_tasks_split_evenly_over_the_four_operators_with_no_sum_shortcut():
    tasks = CountdownTasks(size=64, seed=1, min_numbers=2, max_numbers=2, max_value=10, max_target=50,
                           operators="balanced")
    payloads = [tasks[i].payload for i in range(64)]
    assert [p["operator"] for p in payloads[:8]] == ["+", "-", "*", "/"] * 2  # task i: OPERATORS[i % 4]
    assert sorted(p["operator"] for p in payloads).count("*") == 16
    for op in "+-*/":
        assert sum(p["operator"] == op for p in payloads) == 16
    apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
             "/": lambda a, b: Fraction(a, b)}
    for p in payloads:
        a, b = p["numbers"]
        assert apply[p["operator"]](a, b) == p["target"], p  # the numbers, in order, with the task's operator
        assert 1 <= p["target"] <= 50 and max(a, b) <= 10
        if p["operator"] != "+":
            assert p["target"] != a + b, p  # `a + b` never solves a -, * or / task
        if p["operator"] in "*/":
            assert 1 not in (a, b), p
    # the default generator is unchanged (no operator in the payload) and is not balanced
    plain = CountdownTasks(size=64, seed=1, min_numbers=2, max_numbers=2, max_value=10, max_target=50)
    assert "operator" not in plain[0].payload
    assert sum(p["numbers"][0] + p["numbers"][1] == p["target"]
               for p in (plain[i].payload for i in range(64))) > 16


def test_balanced_tasks_with_more_numbers_end_with_their_operator():
    tasks = CountdownTasks(size=40, seed=5, min_numbers=3, max_numbers=4, max_value=10, max_target=100,
                           operators="balanced")
    for i in range(40):
        p = tasks[i].payload
        assert p["operator"] == "+-*/"[i % 4] and solvable(p["numbers"], p["target"]), p
        if p["operator"] != "+":
            assert p["target"] != sum(p["numbers"]), p


def test_balanced_tasks_that_cannot_fit_the_bounds_say_which_setting_to_raise():
    with pytest.raises(ValueError, match="max_target"):
        CountdownTasks(size=4, min_numbers=2, max_numbers=2, max_value=2, max_target=1, operators="balanced")[2]
    with pytest.raises(ValueError, match="operators"):
        CountdownTasks(operators="even")


@pytest.mark.parametrize("numbers, target, expected", [
    ([3, 5], 8, "3 + 5"), ([9, 6], 3, "9 - 6"), ([6, 3], 2, "6 / 3"), ([3, 5, 2], 16, "(3 + 5) * 2"),
    ([1, 1], 5, None), ([2, 3], 7, None),
])
def test_solve_finds_an_equation_the_checker_accepts_or_none(numbers, target, expected):
    equation = solve(numbers, target)
    assert equation == expected
    if equation is not None:
        value, used = evaluate_expression(equation)
        assert value == target and sorted(used) == sorted(numbers)


def test_solve_agrees_with_brute_force_on_every_small_task():
    for numbers in itertools.product(range(1, 6), repeat=2):
        for target in range(1, 26):
            assert (solve(list(numbers), target) is not None) == solvable(list(numbers), target), (numbers, target)
    equation = solve([4, 7, 3, 9], 24)
    value, used = evaluate_expression(equation)
    assert value == 24 and sorted(used) == [3, 4, 7, 9]
