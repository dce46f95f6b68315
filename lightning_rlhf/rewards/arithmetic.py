"""`arithmetic_steps`: a rule that checks the worked steps of an arithmetic answer, not just its end.

Outcome rewards (`accuracy`) also pay a completion whose steps are wrong but whose answer is right by luck
(`8+13=20, 20+18=39` -> 39). On a small model, GRPO then reinforces the wrong facts along with the lucky
answer. This rule scores 1.0 only when every `a op b = c` step inside `<think>` is true (integers, + - *)
and the `<answer>` equals the last step's result; 0.0 otherwise. Simplified: only chains of binary
integer steps separated by commas are understood; anything else inside <think> scores 0.
"""

from __future__ import annotations

import re

from lightning_rlhf.rewards.registry import REWARDS

_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_BLOCK = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.S)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def steps_correct(completion: str) -> bool:
    """True when every step in <think> is a true `a op b = c` and <answer> holds the last result."""
    m = _BLOCK.search(completion[:5000])
    if m is None:
        return False
    steps = [s for s in m.group(1).split(",") if s.strip()]
    if not steps:
        return False
    result = None
    for s in steps:
        parsed = _STEP.match(s)
        if parsed is None:
            return False
        a, op, b, c = parsed.groups()
        if _OPS[op](int(a), int(b)) != int(c):
            return False
        result = int(c)
    return m.group(2).strip() == str(result)


@REWARDS.register("arithmetic_steps")
def arithmetic_steps_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 when every worked step is true and the answer is the last step's result (see module doc)."""
    return [1.0 if steps_correct(c) else 0.0 for c in completions]
