"""The place-value arithmetic task of the SmolLM2 CPU recipes: worked solutions checked by hand, splits."""

from __future__ import annotations

import pytest

from lightning_rlhf.data import TASKS
from lightning_rlhf.data.place_value import worked
from lightning_rlhf.data.splits import split_of


@pytest.mark.parametrize("a, op, b, reasoning, answer", [
    (47, "+", 38, "40+30=70, 7+8=15, 70+15=85", 85),    # 40+30 = 70, 7+8 = 15, 70+15 = 85
    (83, "-", 29, "83-20=63, 63-9=54", 54),              # 83-20 = 63, then 63-9 = 54
    (47, "*", 6, "40*6=240, 7*6=42, 240+42=282", 282),   # 40*6 = 240, 7*6 = 42, 240+42 = 282
    (90, "-", 10, "90-10=80, 80-0=80", 80),
])
def test_worked_solutions_by_hand(a, op, b, reasoning, answer):
    assert worked(a, op, b) == (reasoning, answer)


def test_rows_splits_and_formats():
    sft = TASKS.get("place_value_sft")(200, seed=3, split="val")
    prompts = TASKS.get("place_value")(200, seed=3, split="val")
    assert [r["question"] for r in sft] == [r["question"] for r in prompts]  # same sampler, same questions
    for r in sft:
        assert split_of(r["question"]) == "val"
        assert r["completion"].endswith(f"<answer>{r['answer']}</answer>") and r["completion"].startswith("<think>")
        assert r["prompt"].startswith(r["question"] + "=?") and eval(r["question"]) == int(r["answer"])
        a, op, b = (r["question"].partition(c) for c in "+-*" if c in r["question"]).__next__()
        assert 10 <= int(a) <= 99 and (2 <= int(b) <= 9 if op == "*" else 10 <= int(b) <= int(a) or op == "+")
    with pytest.raises(ValueError, match="ops must be characters from"):
        TASKS.get("place_value")(5, ops="+/")
