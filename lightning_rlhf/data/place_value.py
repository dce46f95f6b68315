"""Arithmetic for a small pretrained model: two-digit + and -, one-digit x two-digit, worked by place value.

    place_value      -> {"prompt", "answer", "question"}                (GRPO prompts)
    place_value_sft  -> {"prompt", "completion", "answer", "question"}  (cold-start SFT)

A question is `47+38`, `83-29` or `47*6`; the cold-start completion works it by place value in the R1 format:
`<think>40+30=70, 7+8=15, 70+15=85</think><answer>85</answer>`, `<think>83-20=63, 63-9=54</think>...`,
`<think>40*6=240, 7*6=42, 240+42=282</think>...`. `prompt_template` adds the instruction to the question.
Splits come from a stable hash of the question text, as for the other tasks.

Simplified: two operands only; subtraction keeps the larger number first (answers are never negative).
"""

from __future__ import annotations

import random

from lightning_rlhf.data.registry import TASKS
from lightning_rlhf.data.splits import collect

INSTRUCTION = ("{question}=? Think step by step inside <think></think>, then give only the final number inside "
               "<answer></answer>.")


def sample_question(rng: random.Random, ops: str) -> tuple[int, str, int]:
    op = rng.choice(ops)
    if op == "*":
        return rng.randint(10, 99), op, rng.randint(2, 9)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def worked(a: int, op: str, b: int) -> tuple[str, int]:
    """(place-value reasoning, answer) for `a op b`, e.g. (\"40+30=70, 7+8=15, 70+15=85\", 85)."""
    tens, ones = a - a % 10, a % 10
    if op == "*":
        return f"{tens}*{b}={tens * b}, {ones}*{b}={ones * b}, {tens * b}+{ones * b}={a * b}", a * b
    b_tens, b_ones = b - b % 10, b % 10
    if op == "+":
        return (f"{tens}+{b_tens}={tens + b_tens}, {ones}+{b_ones}={ones + b_ones}, "
                f"{tens + b_tens}+{ones + b_ones}={a + b}"), a + b
    return f"{a}-{b_tens}={a - b_tens}, {a - b_tens}-{b_ones}={a - b}", a - b


def _rows(n: int, seed: int, split: str, ops: str, holdout: float, prompt_template: str) -> list[dict]:
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"place_value: ops must be characters from '+-*', got {ops!r}")
    rng = random.Random(seed)

    def sample() -> tuple[str, dict]:
        a, op, b = sample_question(rng, ops)
        reasoning, answer = worked(a, op, b)
        question = f"{a}{op}{b}"
        return question, {"prompt": prompt_template.format(question=question), "answer": str(answer),
                          "question": question, "_reasoning": reasoning}

    return collect(n, split, sample, holdout, "place_value")


@TASKS.register("place_value")
def place_value_problems(n: int, *, seed: int = 0, split: str = "train", ops: str = "+-*", holdout: float = 0.1,
                         prompt_template: str = INSTRUCTION) -> list[dict]:
    """`n` prompt rows {"prompt", "answer", "question"} (see the module docstring)."""
    return [{k: v for k, v in r.items() if k != "_reasoning"}
            for r in _rows(n, seed, split, ops, holdout, prompt_template)]


@TASKS.register("place_value_sft")
def place_value_sft(n: int, *, seed: int = 0, split: str = "train", ops: str = "+-*", holdout: float = 0.1,
                    prompt_template: str = INSTRUCTION) -> list[dict]:
    """`n` cold-start rows: the prompt rows plus the worked `completion` in the think/answer format."""
    rows = _rows(n, seed, split, ops, holdout, prompt_template)
    return [{"prompt": r["prompt"], "answer": r["answer"], "question": r["question"],
             "completion": f"<think>{r['_reasoning']}</think><answer>{r['answer']}</answer>"} for r in rows]
