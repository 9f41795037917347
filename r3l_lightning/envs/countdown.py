"""Countdown: combine the given numbers with + − × ÷ to reach the target, each number used once.

Own generator rather than reasoning-gym's: it is dependency-free, any task index is generated from
(seed, index) alone, and difficulty (count and size of numbers, target range) is set from the config.
Answers are checked by parsing the expression with ``ast`` (integer literals, + − × ÷, parentheses
only) and evaluating it with exact fractions — model text is never ``eval``-ed.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from typing import Literal

from r3l_lightning.engines.constraints import Constraint
from r3l_lightning.envs.answer_format import FORMAT_INSTRUCTIONS, AttemptEpisode
from r3l_lightning.envs.base import Environment, Episode, Task, TaskSource

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOL_ALIASES = {"×": "*", "÷": "/", "−": "-", "\\times": "*", "\\cdot": "*", "\\div": "/"}
_TRAILING_RESULT = re.compile(r"=\s*-?\d+(\.\d+)?\s*$")
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**9

# An answer tag around an arithmetic expression: integers of 1–3 digits, + - * / with one space on each
# side, parentheses. It fixes the response's FORMAT only: which numbers, operators and brackets the
# expression uses is still the model's choice, checked by the same rules as a free-text answer.
ANSWER_GRAMMAR = r"""root ::= "<answer>" expr "</answer>"
expr ::= term | term " " op " " expr
term ::= num | "(" expr ")"
op ::= "+" | "-" | "*" | "/"
num ::= [1-9] [0-9]? [0-9]?
"""


class InvalidEquation(ValueError):
    """The answer is not an arithmetic expression over integer literals."""


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of ``expression`` and the integer literals it uses. Raises :class:`InvalidEquation`."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidEquation(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression
    for symbol, op in _SYMBOL_ALIASES.items():
        text = text.replace(symbol, op)
    text = text.strip()
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as err:
        raise InvalidEquation(f"not a valid arithmetic expression ({getattr(err, 'msg', err)})") from None
    numbers: list[int] = []

    def check_magnitude(value: Fraction) -> Fraction:
        if abs(value) > MAX_MAGNITUDE:
            raise InvalidEquation("a number or intermediate value is too large")
        return value

    def visit(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if not (ast.get_source_segment(text, node) or "").isdigit():
                raise InvalidEquation("numbers must be written as plain decimal integers")
            numbers.append(node.value)
            return check_magnitude(Fraction(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = visit(node.left), visit(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidEquation("division by zero")
            return check_magnitude(_OPS[type(node.op)](left, right))
        raise InvalidEquation(f"only integers, + - * / and parentheses are allowed (found {type(node).__name__})")

    return visit(tree.body), numbers


class CountdownTasks(TaskSource):
    """Seeded Countdown tasks: ``min_numbers``–``max_numbers`` numbers in [1, ``max_value``] and a
    target in [1, ``max_target``] reachable by combining all of them.

    Task ``i`` depends on (``seed``, ``i``) alone, so any index is generated on demand.
    """

    def __init__(self, size: int = 10000, seed: int = 0, min_numbers: int = 3, max_numbers: int = 4,
                 max_value: int = 20, max_target: int = 100) -> None:
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError("need 2 <= min_numbers <= max_numbers")
        if max_value < 1 or max_target < 1:
            raise ValueError("max_value and max_target must be >= 1")
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
            count = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(1, self.max_value) for _ in range(count)]
            target = _combine(numbers, rng)
            if target.denominator == 1 and 1 <= target <= self.max_target:
                return Task(f"countdown-{self.seed}-{index}", {"numbers": numbers, "target": int(target)})


def _combine(numbers: list[int], rng: random.Random) -> Fraction:
    """Fold all numbers, in a random order, with random operations whose result is a non-negative integer."""
    order = numbers[:]
    rng.shuffle(order)
    value = Fraction(order[0])
    for n in order[1:]:
        results = [value + n, value - n, value * n, value / n]
        value = rng.choice([r for r in results if r >= 0 and r.denominator == 1])
    return value


class CountdownEpisode(AttemptEpisode):
    def question(self) -> str:
        p = self.task.payload
        return (f"Using the numbers {p['numbers']}, create an equation that equals {p['target']}. "
                f"Use each number exactly once, with + - * / and parentheses.")

    def check(self, answer: str) -> tuple[str, str]:
        expression = _TRAILING_RESULT.sub("", answer)
        try:
            value, used = evaluate_expression(expression)
        except InvalidEquation as err:
            return "invalid_equation", f"Invalid equation: {err}."
        numbers, target = self.task.payload["numbers"], self.task.payload["target"]
        if Counter(used) == Counter(numbers) and value == target:
            return "correct", "Correct!"
        problems = []
        if value != target:
            shown = str(value) if value.denominator == 1 else f"{value} (≈{float(value):.3g})"
            problems.append(f"the equation evaluates to {shown}, not {target}")
        unused = sorted((Counter(numbers) - Counter(used)).elements())
        extra = sorted((Counter(used) - Counter(numbers)).elements())
        if unused:
            problems.append(f"it does not use {unused}")
        if extra:
            problems.append(f"it uses {extra} beyond the given numbers")
        if unused or extra:
            problems.append(f"each of {sorted(numbers)} must be used exactly once")
        return "incorrect", f"Incorrect: {'; '.join(problems)}."


class CountdownEnv(Environment):
    """Countdown with up to ``max_attempts`` answers and correct / incorrect / invalid-format feedback.

    Args:
        max_attempts: answers per episode; a wrong one is answered "incorrect, try again".
        end_on_invalid_format: a response without an answer tag ends the episode (the spec's rule);
            ``False``: it costs an attempt.
        response_format: ``think`` — reasoning in ``<think>…</think>``, then ``<answer>…</answer>`` (the
            paper's format); ``answer`` — only ``<answer>…</answer>``.
        example: show one solved puzzle in the system prompt.
        constrain_answer: decode every response under :data:`ANSWER_GRAMMAR` (``response_format: answer``
            only), in training and evaluation alike. It removes format failures, not arithmetic ones.
    """

    def __init__(self, max_attempts: int = 3, end_on_invalid_format: bool = True,
                 response_format: Literal["think", "answer"] = "think", example: bool = False,
                 constrain_answer: bool = False) -> None:
        if response_format not in ("think", "answer"):
            raise ValueError(f"response_format must be 'think' or 'answer', got {response_format!r}")
        if constrain_answer and response_format != "answer":
            raise ValueError("constrain_answer needs response_format: answer (the grammar has no <think> part)")
        self.max_turns = max_attempts
        self.end_on_invalid_format = end_on_invalid_format
        self.response_format = response_format
        self.example = example
        self.constrain_answer = constrain_answer
        self._constraint = Constraint(grammar=ANSWER_GRAMMAR) if constrain_answer else None

    def system_prompt(self) -> str:
        rules = ("You solve Countdown puzzles: combine the given numbers with + - * / and parentheses so the "
                 "equation equals the target, using every number exactly once.")
        if self.response_format == "think":
            prompt = f"{rules} Put only the equation, like (3 + 5) * 2, in the answer. {FORMAT_INSTRUCTIONS}"
        else:
            prompt = f"{rules} Answer with the equation inside <answer> </answer>."
        if self.example:
            solved = "<think> 3 + 5 = 8 </think><answer>3 + 5</answer>" if self.response_format == "think" \
                else "<answer>3 + 5</answer>"
            prompt += f" Example: numbers [3, 5], target 8: {solved}"
        return prompt

    def make_episode(self, task: Task) -> Episode:
        return CountdownEpisode(task, self.max_turns, self.end_on_invalid_format)

    def response_constraint(self, task: Task) -> Constraint | None:
        return self._constraint
