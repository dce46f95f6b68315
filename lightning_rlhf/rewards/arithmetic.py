"""`arithmetic_steps`: a rule that checks the worked steps of an arithmetic answer, not just its end.

Outcome rewards (`accuracy`) also pay a completion whose steps are wrong but whose answer is right by luck
(`8+13=20, 20+18=39` -> 39). On a small model, GRPO then reinforces the wrong facts along with the lucky
answer. This rule scores 1.0 only when all of these hold, else 0.0:
  - every comma-separated step inside `<think>` is a true `a op b = c` (integers, + - *);
  - the steps work on the question: each operand is a number of the question, a place-value part of one
    (47 -> 40 and 7, as in `40+30=70, 7+8=15`), or an earlier step's result or a part of it; and every
    number of the question is used, itself or through its parts;
  - when the question is an expression (`12+7-3`), the last step's result is its value;
  - the final answer, read as `accuracy` reads it (the LAST `<answer>` block), is the last step's result.
So `<think>1+1=2</think><answer>2</answer>` earns nothing for `12+7-3=?`.
Simplified: only chains of binary integer steps separated by commas are understood; anything else inside
<think> scores 0. The question's numbers are those of its first `a op b ...` expression, or every integer in
the prompt when it has none (a word problem), so numbers in a system prompt can make a word problem fail.
"""

from __future__ import annotations

import ast
import operator
import re

from lightning_rlhf.rewards.registry import REWARDS
from lightning_rlhf.rewards.rules import extract_answer, reasoning_text

_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_EXPRESSION = re.compile(r"\(?-?\d+\)?(?:\s*[+\-*]\s*\(?-?\d+\)?)+")
_INT = re.compile(r"\d+")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_AST_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def place_parts(n: int) -> set[int]:
    """n and its nonzero place-value parts: 47 -> {47, 40, 7}; 305 -> {305, 300, 5}; signs dropped."""
    digits = str(abs(n))
    parts = {int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"}
    return parts | {abs(n)}


def _evaluate(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        return _AST_OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not integer arithmetic")


def question_numbers(prompt: str) -> tuple[list[int], int | None]:
    """(the question's numbers, the value of its expression or None) from the prompt's first expression."""
    m = _EXPRESSION.search(prompt)
    if m is None:
        return [int(x) for x in _INT.findall(prompt)], None
    try:
        value = _evaluate(ast.parse(m.group().strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        value = None
    return [int(x) for x in _INT.findall(m.group())], value


def steps_correct(completion: str, prompt: str) -> bool:
    """True when the worked steps are true, work on the question and end in the final answer (module doc)."""
    reasoning = reasoning_text(prompt, completion[:5000])
    answer = extract_answer(completion[:5000], prompt)
    numbers, value = question_numbers(prompt)
    if reasoning is None or answer is None or not numbers:
        return False
    steps = [s for s in reasoning.split(",") if s.strip()]
    if not steps:
        return False
    allowed = set().union(*(place_parts(n) for n in numbers))
    used: set[int] = set()
    result = None
    for s in steps:
        parsed = _STEP.match(s)
        if parsed is None:
            return False
        a, op, b, c = int(parsed[1]), parsed[2], int(parsed[3]), int(parsed[4])
        if _OPS[op](a, b) != c or abs(a) not in allowed or abs(b) not in allowed:
            return False
        used |= {abs(a), abs(b)}
        allowed |= place_parts(c)
        result = c
    if any(not (place_parts(n) & used) for n in numbers):
        return False  # a number of the question never entered the work
    if value is not None and result != value:
        return False
    return answer == str(result)


@REWARDS.register("arithmetic_steps")
def arithmetic_steps_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when the worked steps are true, work on the question and end in the answer (see module doc)."""
    return [1.0 if steps_correct(c, p) else 0.0 for p, c in zip(prompts, completions)]
