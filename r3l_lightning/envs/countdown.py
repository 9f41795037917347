"""Countdown: combine the given numbers with + − × ÷ to reach the target, each number used once.

Own generator rather than reasoning-gym's: it is dependency-free, any task index is generated from
(seed, index) alone, and difficulty (count and size of numbers, target range) is set from the config.
Answers are checked by parsing the expression with ``ast`` (integer literals, + − × ÷, parentheses
only) and evaluating it with exact fractions — model text is never ``eval``-ed.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from r3l_lightning.envs.answer_format import FORMAT_INSTRUCTIONS, AttemptEpisode
from r3l_lightning.envs.base import Environment, Episode, Task, TaskSource

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOLS = {"+": ast.Add, "-": ast.Sub, "*": ast.Mult, "/": ast.Div}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**9


class InvalidEquation(ValueError):
    """The answer is not an arithmetic expression over integer literals."""


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of ``expression`` and the integer literals it uses. Raises :class:`InvalidEquation`."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidEquation(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise InvalidEquation(f"not a valid arithmetic expression ({err.msg})") from None
    numbers: list[int] = []

    def visit(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidEquation("division by zero")
            value = _OPS[type(node.op)](left, right)
            if abs(value) > MAX_MAGNITUDE:
                raise InvalidEquation("an intermediate value is too large")
            return value
        raise InvalidEquation(f"only integers, + - * / and parentheses are allowed (found {type(node).__name__})")

    return visit(tree.body), numbers


class CountdownTasks(TaskSource):
    """Seeded Countdown tasks: ``min_numbers``–``max_numbers`` numbers in [1, ``max_value``] and a
    target in [1, ``max_target``] reachable by combining all of them."""

    def __init__(self, size: int = 10000, seed: int = 0, min_numbers: int = 3, max_numbers: int = 4,
                 max_value: int = 20, max_target: int = 100) -> None:
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError("need 2 <= min_numbers <= max_numbers")
        self.size, self.seed = size, seed
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_value, self.max_target = max_value, max_target

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Task:
        if not 0 <= index < self.size:
            raise IndexError(f"task {index} out of range [0, {self.size})")
        rng = random.Random(f"countdown-{self.seed}-{index}")
        while True:
            numbers = [rng.randint(1, self.max_value) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            target = self._combine(numbers, rng)
            if target is not None:
                return Task(f"countdown-{self.seed}-{index}", {"numbers": numbers, "target": target})

    def _combine(self, numbers: list[int], rng: random.Random) -> int | None:
        """Combine all numbers in a random order with random operations; None if the target is unusable."""
        order = numbers[:]
        rng.shuffle(order)
        value = Fraction(order[0])
        for n in order[1:]:
            op = rng.choice("+-*/")
            if op == "-" and value < n:
                op = "+"
            if op == "/" and value % n != 0:
                op = "*"
            value = _OPS[_SYMBOLS[op]](value, Fraction(n))
        if value.denominator != 1 or not 1 <= value <= self.max_target:
            return None
        return int(value)


class CountdownEpisode(AttemptEpisode):
    def question(self) -> str:
        p = self.task.payload
        return (f"Using the numbers {p['numbers']}, create an equation that equals {p['target']}. "
                f"Use each number exactly once, with + - * / and parentheses.")

    def check(self, answer: str) -> tuple[bool, str, str]:
        expression = answer.split("=")[0]
        try:
            value, used = evaluate_expression(expression)
        except InvalidEquation as err:
            return False, "invalid_equation", f"Invalid equation: {err}."
        expected = Counter(self.task.payload["numbers"])
        if Counter(used) != expected:
            return False, "incorrect", (f"Incorrect: the equation uses {sorted(used)} but must use each of "
                                        f"{sorted(expected.elements())} exactly once.")
        target = self.task.payload["target"]
        if value != target:
            shown = str(value) if value.denominator == 1 else f"{value} (≈{float(value):.3g})"
            return False, "incorrect", f"Incorrect: the equation evaluates to {shown}, not {target}."
        return True, "correct", "Correct!"


class CountdownEnv(Environment):
    """Countdown with up to ``max_attempts`` answers and correct / incorrect / invalid-format feedback."""

    def __init__(self, max_attempts: int = 3, end_on_invalid_format: bool = True) -> None:
        self.max_turns = max_attempts
        self.end_on_invalid_format = end_on_invalid_format

    def system_prompt(self) -> str:
        return ("You solve Countdown puzzles: combine the given numbers with + - * / and parentheses so the "
                "equation equals the target, using every number exactly once. Put only the equation, like "
                f"(3 + 5) * 2, in the answer. {FORMAT_INSTRUCTIONS}")

    def make_episode(self, task: Task) -> Episode:
        return CountdownEpisode(task, self.max_turns, self.end_on_invalid_format)
