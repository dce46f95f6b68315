"""Seeded arithmetic task: prompts, SFT "cold start" rows and preference pairs, registered in `TASKS`.

A problem is a short expression such as `12+7-3`; the prompt is `12+7-3=?` (few tokens, so a tiny model
on a CPU can learn it) and the answer is the integer it evaluates to. Three row kinds share one sampler:

    arithmetic_problems -> {"prompt", "answer", "question"}                  (GRPO / PPO prompts)
    sft_examples        -> {"prompt", "completion", "answer", "question"}    (R1-style cold start)
    preference_pairs    -> {"prompt", "chosen", "rejected", "flaw", ...}     (reward-model pairs)

Splits: a question belongs to exactly one of train / val / test, decided by a stable hash of its text
(`split_of` in `splits.py`), so held-out prompts never appear in training whatever the seed or `n`.

Simplifications: `*` is evaluated before `+`/`-` (reasoning steps do products first, then left to
right); `nonnegative=True` resamples until every intermediate result is >= 0 (easier for tiny models);
division is not offered (answers stay integers). Within a call questions are distinct until the split's
question space runs out, after which repeats are allowed.
"""

from __future__ import annotations

import operator
import random
from typing import Callable

from lightning_rlhf.data.registry import TASKS
from lightning_rlhf.data.splits import collect, split_of  # noqa: F401  (split_of: re-exported for callers)

FLAWS = ("wrong_answer", "broken_format", "no_reasoning", "wrong_step", "stops_early")
_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


# ----------------------------------------------------------------------------------------------
# arithmetic problems and their step-by-step solutions


def _eval_steps(nums: list[int], ops: list[str]) -> tuple[list[tuple], int]:
    """Reasoning steps for nums[0] ops[0] nums[1] ...: products first, then left to right.

    Each step is (left_ref, op, right_ref); a ref is ("lit", value) or ("step", index of an earlier step).
    Returns (steps, value); `_render` turns them into text, optionally with a step's result altered.
    """
    terms: list[tuple[str, int]] = [("lit", nums[0])]
    addops: list[str] = []
    steps: list[tuple] = []
    for op, num in zip(ops, nums[1:]):
        if op == "*":
            steps.append((terms[-1], "*", ("lit", num)))
            terms[-1] = ("step", len(steps) - 1)
        else:
            addops.append(op)
            terms.append(("lit", num))
    acc = terms[0]
    for op, term in zip(addops, terms[1:]):
        steps.append((acc, op, term))
        acc = ("step", len(steps) - 1)
    values = _step_values(steps)
    return steps, (values[-1] if steps else nums[0])


def _step_values(steps: list[tuple], override: dict[int, int] | None = None) -> list[int]:
    """The result of every step; `override` replaces step i's result (later steps use the new value)."""
    override = override or {}
    values: list[int] = []
    for i, (left, op, right) in enumerate(steps):
        a = left[1] if left[0] == "lit" else values[left[1]]
        b = right[1] if right[0] == "lit" else values[right[1]]
        values.append(override.get(i, _OPS[op](a, b)))
    return values


def _render(steps: list[tuple], override: dict[int, int] | None = None) -> tuple[str, int]:
    """('12+7=19, 19-3=16', final value) for `steps`, with `override` applied."""
    values = _step_values(steps, override)
    parts = []
    for (left, op, right), value in zip(steps, values):
        a = left[1] if left[0] == "lit" else values[left[1]]
        b = right[1] if right[0] == "lit" else values[right[1]]
        parts.append(f"{a}{op}{b}={value}")
    return ", ".join(parts), values[-1]


def _check_args(min_terms: int, max_terms: int, min_operand: int, max_operand: int, ops: str) -> None:
    if min_terms < 2 or max_terms < min_terms:
        raise ValueError(f"arithmetic: need 2 <= min_terms <= max_terms, got min_terms={min_terms}, "
                         f"max_terms={max_terms}")
    if min_operand < 0 or max_operand < min_operand:
        raise ValueError(f"arithmetic: need 0 <= min_operand <= max_operand, got {min_operand}, {max_operand}")
    bad = sorted(set(ops) - set(_OPS))
    if not ops or bad:
        raise ValueError(f"arithmetic: ops must be a non-empty string of characters from '+-*', got {ops!r}")


def _problems(n: int, seed: int, split: str, min_terms: int, max_terms: int, min_operand: int,
              max_operand: int, ops: str, nonnegative: bool, holdout: float) -> list[dict]:
    """Internal rows with the parsed steps kept (key "_steps") for sft_examples / preference_pairs."""
    _check_args(min_terms, max_terms, min_operand, max_operand, ops)
    rng = random.Random(seed)

    def sample() -> tuple[str, dict]:
        while True:
            k = rng.randint(min_terms, max_terms)
            nums = [rng.randint(min_operand, max_operand) for _ in range(k)]
            chosen_ops = [rng.choice(ops) for _ in range(k - 1)]
            steps, value = _eval_steps(nums, chosen_ops)
            if not nonnegative or min(_step_values(steps)) >= 0:
                break
        question = "".join(str(x) + o for x, o in zip(nums, chosen_ops)) + str(nums[-1])
        return question, {"question": question, "answer": str(value), "_steps": steps}

    return collect(n, split, sample, holdout, "arithmetic")


def _public(row: dict, prompt_template: str) -> dict:
    return {"prompt": prompt_template.format(question=row["question"]), "answer": row["answer"],
            "question": row["question"]}


@TASKS.register("arithmetic")
def arithmetic_problems(n: int, *, seed: int = 0, split: str = "train", min_terms: int = 2, max_terms: int = 3,
                        min_operand: int = 1, max_operand: int = 20, ops: str = "+-", nonnegative: bool = True,
                        prompt_template: str = "{question}=?", holdout: float = 0.1) -> list[dict]:
    """`n` prompt rows {"prompt": "12+7-3=?", "answer": "16", "question": "12+7-3"}; same seed, same rows.

    `split` is train / val / test (held-out questions are a stable-hash `holdout` share, never in train).
    `prompt_template` is formatted with `question`.
    """
    rows = _problems(n, seed, split, min_terms, max_terms, min_operand, max_operand, ops, nonnegative, holdout)
    return [_public(r, prompt_template) for r in rows]


def format_completion(reasoning: str, answer: str) -> str:
    """The R1 format: `<think>reasoning</think><answer>answer</answer>`."""
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


@TASKS.register("arithmetic_sft")
def sft_examples(n: int, *, seed: int = 0, split: str = "train", min_terms: int = 2, max_terms: int = 3,
                 min_operand: int = 1, max_operand: int = 20, ops: str = "+-", nonnegative: bool = True,
                 prompt_template: str = "{question}=?", holdout: float = 0.1,
                 answer_only_share: float = 0.0, stops_early_share: float = 0.0) -> list[dict]:
    """SFT rows: arithmetic_problems' rows plus "completion" (and "style": "worked" or "answer_only").

    E.g. `<think>12+7=19, 19-3=16</think><answer>16</answer>`: the R1 cold-start format, every step right.
    `answer_only_share` of the rows (a seeded draw per row) are just `<answer>16</answer>`: the habit of a
    base model that answers without working. The answer is still right, so SFT teaches both styles, and an
    RL stage has a behaviour to choose between. The problems are the same for every share.
    `stops_early_share` of the rows with two or more steps stop after the first step and answer its result
    (`<think>12+7=19</think><answer>19</answer>`, wrong): the "underthinking" of a weak model's traces,
    kept unfiltered. Greedy decoding follows whichever habit is the majority; RL with an accuracy reward
    learns to finish the work (longer responses, as in R1-Zero). Shares are drawn in that order.
    """
    for name, share in (("answer_only_share", answer_only_share), ("stops_early_share", stops_early_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"arithmetic_sft: {name} must be in [0, 1], got {share!r}")
    if answer_only_share + stops_early_share > 1.0:
        raise ValueError(f"arithmetic_sft: answer_only_share + stops_early_share must be <= 1, got "
                         f"{answer_only_share} + {stops_early_share}")
    rows = _problems(n, seed, split, min_terms, max_terms, min_operand, max_operand, ops, nonnegative, holdout)
    style_rng = random.Random(f"sft-style-{seed}")
    out = []
    for r in rows:
        u = style_rng.random()
        if u < answer_only_share:
            style, completion = "answer_only", f"<answer>{r['answer']}</answer>"
        elif u < answer_only_share + stops_early_share and len(r["_steps"]) > 1:
            style, completion = "stops_early", _stops_early(r["_steps"])
        else:
            style, completion = "worked", format_completion(_render(r["_steps"])[0], r["answer"])
        out.append({**_public(r, prompt_template), "completion": completion, "style": style})
    return out


# ----------------------------------------------------------------------------------------------
# preference pairs: chosen = correct and well formatted; rejected = one named flaw


def _small_deltas(rng: random.Random) -> list[int]:
    deltas = [-3, -2, -1, 1, 2, 3]
    rng.shuffle(deltas)
    return deltas


def _wrong_answer(steps: list[tuple], answer: int, rng: random.Random, nonnegative: bool) -> str:
    """Reasoning correct, but the <answer> is off by 1-3 (disagrees with the last step)."""
    reasoning, _ = _render(steps)
    delta = next(d for d in _small_deltas(rng) if not (nonnegative and answer + d < 0))
    return format_completion(reasoning, str(answer + delta))


def _wrong_step(steps: list[tuple], answer: int, rng: random.Random, nonnegative: bool) -> str | None:
    """One step's result is off by 1-3; later steps carry the wrong value, so the final answer is wrong too."""
    true_values = _step_values(steps)
    for i in rng.sample(range(len(steps)), len(steps)):
        for d in _small_deltas(rng):
            override = {i: true_values[i] + d}
            values = _step_values(steps, override)
            if values[-1] != answer and not (nonnegative and min(values) < 0):
                reasoning, final = _render(steps, override)
                return format_completion(reasoning, str(final))
    return None


def _stops_early(steps: list[tuple]) -> str:
    """Only the first step is worked, and its result is given as the answer (wrong when there are more)."""
    reasoning, value = _render(steps[:1])
    return format_completion(reasoning, str(value))


def _broken_format(steps: list[tuple], answer: int, rng: random.Random) -> str:
    """Correct content with the R1 tags missing or misordered (one of four variants)."""
    reasoning, _ = _render(steps)
    variants = [
        f"<answer>{answer}</answer><think>{reasoning}</think>",  # misordered
        f"<think>{reasoning}<answer>{answer}</answer>",  # no </think>
        f"{reasoning}. The answer is {answer}.",  # no tags at all
        f"<think>{reasoning}</think>{answer}",  # no answer tags
    ]
    return rng.choice(variants)


def _rejected(flaw: str, steps: list[tuple], answer: int, rng: random.Random, nonnegative: bool) -> tuple[str, str]:
    if flaw == "stops_early":
        if len(steps) > 1:
            return flaw, _stops_early(steps)
        flaw = "wrong_answer"  # a one-step problem cannot stop early
    if flaw == "wrong_step":
        text = _wrong_step(steps, answer, rng, nonnegative)
        if text is not None:
            return flaw, text
        flaw = "wrong_answer"  # no step can be altered without breaking the constraints; rare
    if flaw == "wrong_answer":
        return flaw, _wrong_answer(steps, answer, rng, nonnegative)
    if flaw == "broken_format":
        return flaw, _broken_format(steps, answer, rng)
    return flaw, f"<answer>{answer}</answer>"  # no_reasoning


@TASKS.register("arithmetic_pairs")
def preference_pairs(n: int, *, seed: int = 0, split: str = "train", min_terms: int = 2, max_terms: int = 3,
                     min_operand: int = 1, max_operand: int = 20, ops: str = "+-", nonnegative: bool = True,
                     prompt_template: str = "{question}=?", holdout: float = 0.1,
                     flaws: tuple[str, ...] | list[str] = FLAWS) -> list[dict]:
    """Pairs {"prompt", "chosen", "rejected", "flaw", "answer", "question"}; flaw kinds cycle through `flaws`.

    wrong_answer: correct reasoning, <answer> off by 1-3.  broken_format: right content, tags missing or
    misordered.  no_reasoning: just `<answer>16</answer>`.  wrong_step: one step off by 1-3, carried through.
    stops_early: only the first step worked and its result given as the answer.
    """
    flaws = tuple(flaws)
    bad = [f for f in flaws if f not in FLAWS]
    if not flaws or bad:
        raise ValueError(f"arithmetic_pairs: unknown flaw(s) {bad or flaws!r}. Valid flaws: {', '.join(FLAWS)}")
    rows = _problems(n, seed, split, min_terms, max_terms, min_operand, max_operand, ops, nonnegative, holdout)
    rng = random.Random(f"pairs-{seed}")
    out = []
    for i, r in enumerate(rows):
        reasoning, _ = _render(r["_steps"])
        flaw, rejected = _rejected(flaws[i % len(flaws)], r["_steps"], int(r["answer"]), rng, nonnegative)
        out.append({"prompt": prompt_template.format(question=r["question"]),
                    "chosen": format_completion(reasoning, r["answer"]), "rejected": rejected, "flaw": flaw,
                    "answer": r["answer"], "question": r["question"]})
    return out

