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
from r3l_lightning.envs.answer_format import FORMAT_INSTRUCTIONS, AttemptEpisode, extract_answer
from r3l_lightning.envs.base import Environment, Episode, GroundedField, Task, TaskSource
from r3l_lightning.trajectory import Trajectory

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



def answer_grammar(operands: int, numbers: list[int] | None = None) -> str:
    """:data:`ANSWER_GRAMMAR` limited to expressions with exactly ``operands`` numbers (so ``operands`` − 1
    operators): a length bound, as a task with n numbers needs n of them. With ``numbers``, each number written is
    one of them (how often each is used is still checked by the rules, not by the grammar). Which numbers,
    operators and brackets the expression uses is otherwise the model's choice. Rule ``e<k>`` is an expression
    with k numbers, ``p<k>`` one that may stand next to an operator (a number, or a bracketed ``e<k>`` for k > 1)."""
    if operands < 1:
        raise ValueError(f"an answer needs at least one number, got operands={operands}")
    rules = ['root ::= "<answer>" e{0} "</answer>"'.format(operands), 'e1 ::= num', 'p1 ::= num']
    for k in range(2, operands + 1):
        splits = " | ".join(f'p{i} " " op " " p{k - i}' for i in range(1, k))
        rules.append(f"e{k} ::= {splits}")
        if k < operands:
            rules.append(f'p{k} ::= "(" e{k} ")" | e{k}')
    number = " | ".join(f'"{n}"' for n in sorted(set(numbers))) if numbers else "[1-9] [0-9]? [0-9]?"
    rules += ['op ::= "+" | "-" | "*" | "/"', f"num ::= {number}"]
    return "\n".join(rules) + "\n"


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


OPERATORS: tuple[str, ...] = ("+", "-", "*", "/")


class CountdownTasks(TaskSource):
    """Seeded Countdown tasks: ``min_numbers``–``max_numbers`` numbers in [1, ``max_value``] and a
    target in [1, ``max_target``] reachable by combining all of them.

    ``operators``:

    - ``any``: the numbers are folded, in a random order, with random operations (a target that is the
      sum of the numbers is common: ``a + b`` then solves many tasks);
    - ``balanced``: task ``i`` is built with ``OPERATORS[i % 4]`` (+ − × ÷) as its last operation, so the
      four operators each make a quarter of the tasks, and a target built with − × or ÷ is never the sum of
      the numbers (no one-operator shortcut). Its numbers never include 1 as an operand of × or ÷ (``a * 1``
      and ``a / 1`` would be the number itself). The payload names the operator (``"operator"``).

    Task ``i`` depends on (``seed``, ``i``) alone, so any index is generated on demand.
    """

    def __init__(self, size: int = 10000, seed: int = 0, min_numbers: int = 3, max_numbers: int = 4,
                 max_value: int = 20, max_target: int = 100, operators: Literal["any", "balanced"] = "any") -> None:
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError("need 2 <= min_numbers <= max_numbers")
        if max_value < 2 or max_target < 1:
            raise ValueError("need max_value >= 2 and max_target >= 1")
        if operators not in ("any", "balanced"):
            raise ValueError(f"operators must be 'any' or 'balanced', got {operators!r}")
        self.size, self.seed = size, seed
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_value, self.max_target = max_value, max_target
        self.operators = operators

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Task:
        if not 0 <= index < self.size:
            raise IndexError(f"task {index} out of range [0, {self.size})")
        rng = random.Random(f"countdown-{self.seed}-{index}")
        operator = OPERATORS[index % len(OPERATORS)] if self.operators == "balanced" else None
        for _ in range(100_000):
            count = rng.randint(self.min_numbers, self.max_numbers)
            numbers = [rng.randint(1, self.max_value) for _ in range(count)]
            target = _combine(numbers, rng) if operator is None else _combine_ending_with(numbers, operator, rng)
            if target is None or target.denominator != 1 or not 1 <= target <= self.max_target:
                continue
            if operator is None:
                return Task(f"countdown-{self.seed}-{index}", {"numbers": numbers, "target": int(target)})
            if operator != "+" and target == sum(numbers):
                continue
            return Task(f"countdown-{self.seed}-{index}",
                        {"numbers": numbers, "target": int(target), "operator": operator})
        raise ValueError(f"no Countdown task with last operation {operator!r} fits max_value={self.max_value}, "
                         f"max_target={self.max_target} (task {index}): raise max_target or max_value")


def _combine(numbers: list[int], rng: random.Random) -> Fraction:
    """Fold all numbers, in a random order, with random operations whose result is a non-negative integer."""
    order = numbers[:]
    rng.shuffle(order)
    value = Fraction(order[0])
    for n in order[1:]:
        value = rng.choice([r for r in _results(value, n) if r >= 0 and r.denominator == 1])
    return value


def _combine_ending_with(numbers: list[int], operator: str, rng: random.Random) -> Fraction | None:
    """Fold all numbers but the last with :func:`_combine`, then apply ``operator`` with the last one; None
    when that last operation is not a positive integer, or multiplies or divides by 1."""
    *first, last = numbers
    value = _combine(first, rng) if len(first) > 1 else Fraction(first[0])
    if operator in "*/" and 1 in (value, last):
        return None
    result = _results(value, last)[OPERATORS.index(operator)]
    return result if result > 0 and result.denominator == 1 else None


def _results(value: Fraction, n: int) -> list[Fraction]:
    """``value`` combined with ``n`` by each of :data:`OPERATORS`, in their order."""
    return [value + n, value - n, value * n, value / n]


def solve(numbers: list[int], target: int) -> str | None:
    """An equation that uses every number once and equals ``target``, or None when there is none.

    Exhaustive search over every split of the numbers into two groups, combined with + − × ÷ in exact
    fractions (any order, any bracketing). The equation is written as the bounded answer grammar accepts it:
    single spaces around operators, brackets around every compound operand (``(3 + 5) * 2``).
    """
    goal = Fraction(target)

    def expressions(items: tuple[int, ...]):
        if len(items) == 1:
            yield Fraction(items[0]), str(items[0]), True
            return
        seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        n = len(items)
        for mask in range(1, 2**n - 1):
            left = tuple(items[i] for i in range(n) if mask >> i & 1)
            right = tuple(items[i] for i in range(n) if not mask >> i & 1)
            key = (tuple(sorted(left)), tuple(sorted(right)))
            if key in seen:
                continue
            seen.add(key)
            for a, text_a, atom_a in expressions(left):
                for b, text_b, atom_b in expressions(right):
                    ta = text_a if atom_a else f"({text_a})"
                    tb = text_b if atom_b else f"({text_b})"
                    for symbol, value in zip(OPERATORS, (a + b, a - b, a * b, a / b if b else None)):
                        if value is not None:
                            yield value, f"{ta} {symbol} {tb}", False

    for value, text, _ in expressions(tuple(numbers)):
        if value == goal:
            return text
    return None


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
        bound_operands: with ``constrain_answer``, allow exactly as many numbers as the task gives
            (:func:`answer_grammar`), so an answer cannot run past ``max_new_tokens`` as ``1 + 2 + 3 + …``.
        operands_from_task: with ``bound_operands``, every number written is one of the task's numbers: the
            policy still chooses the operators, the order and the brackets (and may repeat a number, which the
            rules then reject).
    """

    def __init__(self, max_attempts: int = 3, end_on_invalid_format: bool = True,
                 response_format: Literal["think", "answer"] = "think", example: bool = False,
                 constrain_answer: bool = False, bound_operands: bool = False,
                 operands_from_task: bool = False) -> None:
        if response_format not in ("think", "answer"):
            raise ValueError(f"response_format must be 'think' or 'answer', got {response_format!r}")
        if constrain_answer and response_format != "answer":
            raise ValueError("constrain_answer needs response_format: answer (the grammar has no <think> part)")
        if bound_operands and not constrain_answer:
            raise ValueError("bound_operands bounds the answer grammar: set constrain_answer: true as well")
        if operands_from_task and not bound_operands:
            raise ValueError("operands_from_task restricts the bounded answer grammar: set bound_operands: true as well")
        self.max_turns = max_attempts
        self.end_on_invalid_format = end_on_invalid_format
        self.response_format = response_format
        self.example = example
        self.constrain_answer = constrain_answer
        self.bound_operands = bound_operands
        self.operands_from_task = operands_from_task

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
        if not self.constrain_answer:
            return None
        if self.bound_operands:
            numbers = task.payload["numbers"]
            return Constraint(grammar=answer_grammar(len(numbers), numbers if self.operands_from_task else None))
        return Constraint(grammar=ANSWER_GRAMMAR)

    def grounded_fields(self, task: Task, trajectory: Trajectory) -> list[GroundedField]:
        """``equation_to_try``: an equation over the task's numbers (as many as the task gives, each one of
        them), to be answered next."""
        return [GroundedField(
            "equation_to_try",
            "an equation over the given numbers, not one that already failed, that equals the target",
            ({"type": "string", "pattern": equation_pattern(task.payload["numbers"])},),
            "Try the equation {value}.",
        )]

    def reference_report(self, task: Task, trajectory: Trajectory) -> dict | None:
        """A report from :func:`solve`'s equation: what the answers evaluated to, which operators the
        solution needs, and the solution itself (also as ``equation_to_try``); the pivot is step 0 (the first
        answer's strategy). None for a solved trajectory."""
        numbers, target = task.payload["numbers"], task.payload["target"]
        if trajectory.reward >= 1 or trajectory.num_turns == 0:
            return None
        solution = solve(numbers, target)
        if solution is None:
            return None
        answers = [extract_answer(a) for a in trajectory.actions]
        shown = [_describe(a) for a in answers]
        needed = sorted({_OPERATOR_NAMES[ch] for ch in solution if ch in _OPERATOR_NAMES})
        return {
            "trajectory_summary": f"The agent answered {'; then '.join(shown)}. None of these equals {target}.",
            "root_cause_analysis": (f"{shown[0]} misses the target {target}: reaching {target} from "
                                    f"{_listing(numbers)} takes {' and '.join(needed)}."),
            "trajectory_outcome": "failure",
            "improvement_suggestion": f"A correct equation is {solution}.",
            "retry_from_step": 0,
            "equation_to_try": solution,
        }


_OPERATOR_NAMES = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}


def _describe(answer: str | None) -> str:
    if answer is None:
        return "no equation in an answer tag"
    try:
        value, _ = evaluate_expression(_TRAILING_RESULT.sub("", answer))
    except InvalidEquation:
        return f"{answer} (not a valid equation)"
    shown = str(value) if value.denominator == 1 else f"{float(value):.3g}"
    return f"{answer} (= {shown})"


def _listing(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers[:-1]) + f" and {numbers[-1]}" if len(numbers) > 1 else str(numbers[0])


def equation_pattern(numbers: list[int]) -> str:
    """A regular expression (JSON-schema ``pattern``) of equations with as many numbers as ``numbers``, each one
    of them, joined by + − × ÷ with single spaces, brackets allowed (their balance and each number's count are
    left to the checker)."""
    choice = "(" + "|".join(str(n) for n in sorted(set(numbers), reverse=True)) + ")"
    operand = rf"\(*{choice}\)*"
    return "^" + operand + rf"( [-+*/] {operand})" + "{" + str(len(numbers) - 1) + "}$"

