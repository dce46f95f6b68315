"""Countdown task (TinyZero): reach a target with each given number used once and + - * /.

`countdown_problems` makes solvable problems by drawing numbers and combining them into a random
expression; the expression's value is the target (kept in the row as "solution", one answer among
possibly many). `countdown_check` verifies a model's equation without `eval`: it parses with `ast` and
allows only integer literals, + - * / and parentheses.

Simplifications: every intermediate value of the generating expression is a non-negative integer
(division only when exact), so targets are integers; the checker itself accepts any exact rational
arithmetic (e.g. `(1 + 2) / 3 * 4`). Unary minus is not allowed in answers (numbers are used as given).
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Sequence

from lightning_rlhf.data.registry import TASKS
from lightning_rlhf.data.splits import collect

DEFAULT_PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. Use each number exactly "
                  "once, with + - * / and parentheses. Think inside <think></think>, then give only the equation "
                  "inside <answer></answer>, for example <answer>(1 + 2) * 3</answer>.")
_AST_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
            ast.Div: lambda a, b: a / b}
_ALLOWED_CHARS = re.compile(r"^[0-9\s+\-*/().]*$")
_MAX_LEN = 200


def _combine(left: tuple[str, int, bool], right: tuple[str, int, bool], op: str) -> tuple[str, int, bool] | None:
    """Join two (text, value, is_atom) parts with `op`; None if the result is not a non-negative integer."""
    a, b = left[1], right[1]
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        if b == 0 or a % b:
            return None
        value = a // b
    if value < 0:
        return None
    wrap = [t if atom else f"({t})" for t, _, atom in (left, right)]
    return f"{wrap[0]} {op} {wrap[1]}", value, False


def _random_expression(numbers: Sequence[int], rng: random.Random) -> tuple[str, int] | None:
    """Combine `numbers` (each once) by repeatedly joining two random parts; None if a step is invalid."""
    parts = [(str(x), x, True) for x in numbers]
    rng.shuffle(parts)
    while len(parts) > 1:
        i, j = rng.sample(range(len(parts)), 2)
        joined = _combine(parts[i], parts[j], rng.choice("+-*/"))
        if joined is None:
            return None
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [joined]
    return parts[0][0], parts[0][1]


@TASKS.register("countdown")
def countdown_problems(n: int, *, seed: int = 0, split: str = "train", num_numbers: int | Sequence[int] = (3, 4),
                       min_number: int = 1, max_number: int = 100, min_target: int = 1, max_target: int = 100,
                       prompt_template: str = DEFAULT_PROMPT, holdout: float = 0.1) -> list[dict]:
    """`n` solvable rows {"prompt", "answer": str(target), "target", "numbers", "solution"}.

    `num_numbers` is a count or a list of counts to draw from (TinyZero uses 3 and 4). `prompt_template`
    is formatted with `numbers` (e.g. "[3, 7, 25]") and `target`. Split by a stable hash of numbers+target.
    """
    counts = [num_numbers] if isinstance(num_numbers, int) else list(num_numbers)
    if not counts or min(counts) < 2:
        raise ValueError(f"countdown: num_numbers must be >= 2 (or a list of such counts), got {num_numbers!r}")
    if min_number < 0 or max_number < min_number or max_target < min_target:
        raise ValueError(f"countdown: need 0 <= min_number <= max_number and min_target <= max_target, got "
                         f"numbers {min_number}..{max_number}, targets {min_target}..{max_target}")
    rng = random.Random(seed)

    def sample() -> tuple[str, dict]:
        for _ in range(100_000):
            numbers = [rng.randint(min_number, max_number) for _ in range(rng.choice(counts))]
            made = _random_expression(numbers, rng)
            if made is not None and min_target <= made[1] <= max_target:
                break
        else:
            raise ValueError("countdown: no expression hits the target range; widen min_target..max_target")
        expr, target = made
        row = {"prompt": prompt_template.format(numbers=numbers, target=target), "answer": str(target),
               "target": target, "numbers": numbers, "solution": expr}
        return f"{sorted(numbers)}->{target}", row

    return collect(n, split, sample, holdout, "countdown")


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _AST_OPS[type(node.op)](left, right)  # ZeroDivisionError is caught by the caller
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def countdown_check(equation: str, numbers: Sequence[int], target: float) -> bool:
    """True iff `equation` uses each of `numbers` exactly once with + - * / ( ) and equals `target` (1e-6).

    A trailing `= <target>` is tolerated ("(3 + 7) * 2 = 20"). Never evaluates code: anything but integer
    literals, the four operators and parentheses (names, calls, `**`, unary minus, floats) gives False.
    """
    if not isinstance(equation, str):
        return False
    text = equation.strip()
    if "=" in text:
        text, _, rhs = text.partition("=")
        try:
            if "=" in rhs or abs(float(rhs.strip()) - float(target)) > 1e-6:
                return False
        except ValueError:
            return False
    if not text.strip() or len(text) > _MAX_LEN or not _ALLOWED_CHARS.match(text):
        return False
    try:
        used: list[int] = []
        value = _evaluate(ast.parse(text.strip(), mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return False
    if Counter(used) != Counter(int(x) for x in numbers):
        return False
    return abs(float(value) - float(target)) <= 1e-6
