"""Task generators: arithmetic prompts / SFT rows / preference pairs, and the countdown task + checker."""

import json
import re

import pytest

from lightning_rlhf.data.countdown import countdown_check, countdown_problems
from lightning_rlhf.data.tasks import (FLAWS, TASKS, _eval_steps, _render, arithmetic_problems, preference_pairs,
                                       sft_examples, split_of)

R1 = re.compile(r"^<think>([^<]*)</think><answer>([^<]*)</answer>$")
STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def _steps(reasoning: str) -> list[tuple[str, int]]:
    """'12+7=19, 19-3=16' -> [('12+7', 19), ('19-3', 16)]."""
    out = []
    for part in reasoning.split(", "):
        m = STEP.match(part)
        assert m, f"step {part!r} is not 'a op b = c'"
        out.append((m.group(1) + m.group(2) + m.group(3), int(m.group(4))))
    return out


# ---------------------------------------------------------------------------------------- arithmetic


def test_registry_names():
    for name in ("arithmetic", "arithmetic_sft", "arithmetic_pairs", "countdown"):
        assert name in TASKS
    with pytest.raises(ValueError, match="arithmetic"):
        TASKS.get("arithmetik")


def test_same_seed_same_rows_other_seed_other_rows():
    a = arithmetic_problems(50, seed=3)
    assert a == arithmetic_problems(50, seed=3)
    assert a != arithmetic_problems(50, seed=4)
    assert len(a) == 50 and len({r["question"] for r in a}) == 50  # distinct while the space allows


def test_default_prompt_and_answers_are_correct():
    rows = arithmetic_problems(300, seed=0)
    for r in rows:
        assert set(r) == {"prompt", "answer", "question"}
        assert r["prompt"] == r["question"] + "=?"
        assert re.fullmatch(r"\d+([+-]\d+){1,2}", r["question"])  # 2..3 terms, ops +-
        assert eval(r["question"]) == int(r["answer"])  # test-only eval of a generated expression
        assert int(r["answer"]) >= 0  # nonnegative=True by default
        assert all(1 <= int(x) <= 20 for x in re.findall(r"\d+", r["question"]))


def test_multiplication_precedence_and_negative_option():
    rows = arithmetic_problems(300, seed=1, ops="+-*", max_terms=4, nonnegative=False)
    assert any("*" in r["question"] for r in rows)
    for r in rows:
        assert eval(r["question"]) == int(r["answer"])
    assert any(int(r["answer"]) < 0 for r in rows)  # 300 draws of a-b-c... over 1..20 go negative


def test_reasoning_steps_by_hand():
    # 12+7-3: 12+7=19, then 19-3=16
    assert _render(_eval_steps([12, 7, 3], ["+", "-"])[0]) == ("12+7=19, 19-3=16", 16)
    # 2+3*4: the product first (3*4=12), then 2+12=14
    assert _render(_eval_steps([2, 3, 4], ["+", "*"])[0]) == ("3*4=12, 2+12=14", 14)
    # altering step 0 of 12+7-3 to 20 carries through: 20-3=17
    assert _render(_eval_steps([12, 7, 3], ["+", "-"])[0], {0: 20}) == ("12+7=20, 20-3=17", 17)


def test_splits_never_overlap():
    # two-term sums up to 9: a small space, so val/test run out of fresh questions and repeat
    kw = dict(max_terms=2, max_operand=9)
    train = {r["question"] for r in arithmetic_problems(400, seed=0, split="train", **kw)}
    val = {r["question"] for r in arithmetic_problems(100, seed=0, split="val", **kw)}
    test = {r["question"] for r in arithmetic_problems(100, seed=5, split="test", **kw)}
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert all(split_of(q) == "val" for q in val)
    assert arithmetic_problems(5, split="validation", **kw) == arithmetic_problems(5, split="val", **kw)


def test_tiny_question_space_repeats_then_explains_an_empty_split():
    # operands 1..1 with two terms: only '1+1' and '1-1' (both hash into train)
    assert {split_of("1+1"), split_of("1-1")} == {"train"}
    rows = arithmetic_problems(5, max_terms=2, max_operand=1)
    assert {r["question"] for r in rows} == {"1+1", "1-1"} and len(rows) == 5  # repeats once exhausted
    with pytest.raises(ValueError, match="found no 'val' problems.*Widen"):
        arithmetic_problems(3, split="val", max_terms=2, max_operand=1)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, val"):
        arithmetic_problems(3, split="dev")
    with pytest.raises(ValueError, match="ops"):
        arithmetic_problems(3, ops="+/")
    with pytest.raises(ValueError, match="min_terms"):
        arithmetic_problems(3, min_terms=1)


def test_sft_completion_reasoning_is_right():
    rows = sft_examples(200, seed=2, ops="+-*", max_terms=4)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in arithmetic_problems(200, seed=2, ops="+-*",
                                                                                     max_terms=4)]
    for r in rows:
        m = R1.match(r["completion"])
        assert m, r["completion"]
        steps = _steps(m.group(1))
        assert len(steps) == len(re.findall(r"[+\-*]", r["question"]))  # one step per operator
        for expr, value in steps:
            assert eval(expr) == value
        assert steps[-1][1] == int(r["answer"]) == int(m.group(2))


def test_sft_styles_shares_and_what_each_style_writes():
    n = 2000
    clean = sft_examples(n, seed=3)
    mixed = sft_examples(n, seed=3, answer_only_share=0.2, stops_early_share=0.5)
    assert [r["prompt"] for r in mixed] == [r["prompt"] for r in clean]  # same problems, only styles differ
    assert {r["style"] for r in clean} == {"worked"}
    multi = [r for r in mixed if len(re.findall(r"[+\-*]", r["question"])) > 1]
    share = {s: sum(r["style"] == s for r in mixed) / n for s in ("answer_only", "stops_early")}
    # answer_only is drawn for every row; stops_early only applies to multi-step rows (a 1-step row stays worked)
    assert abs(share["answer_only"] - 0.2) < 0.03
    assert abs(sum(r["style"] == "stops_early" for r in multi) / len(multi) - 0.5) < 0.05
    for r, c in zip(mixed, clean):
        if r["style"] == "answer_only":
            assert r["completion"] == f"<answer>{r['answer']}</answer>"
        elif r["style"] == "stops_early":  # 12+7-3 -> "<think>12+7=19</think><answer>19</answer>"
            (expr, value), = _steps(R1.match(r["completion"]).group(1))
            assert c["completion"].startswith(f"<think>{expr}={value}, ")
            # operands >= 1 with + and -, so the first step's result is never the final answer
            assert r["completion"].endswith(f"<answer>{value}</answer>") and str(value) != r["answer"]
        else:
            assert r["completion"] == c["completion"]
    with pytest.raises(ValueError, match="stops_early_share"):
        sft_examples(2, stops_early_share=1.5)
    with pytest.raises(ValueError, match="answer_only_share \\+ stops_early_share"):
        sft_examples(2, answer_only_share=0.6, stops_early_share=0.6)


def test_preference_pairs_each_flaw_as_described():
    rows = preference_pairs(40, seed=0)
    for i, r in enumerate(rows):  # flaws cycle; a one-step problem cannot stop early and gets wrong_answer
        one_step = len(re.findall(r"[+\-*]", r["question"])) == 1
        assert r["flaw"] == FLAWS[i % len(FLAWS)] or (FLAWS[i % len(FLAWS)], r["flaw"], one_step) == (
            "stops_early", "wrong_answer", True)
    assert {r["flaw"] for r in rows} == set(FLAWS)
    for r in rows:
        assert r["rejected"] != r["chosen"]
        chosen = R1.match(r["chosen"])
        assert chosen and chosen.group(2) == r["answer"]
        assert all(eval(e) == v for e, v in _steps(chosen.group(1)))
        rej = R1.match(r["rejected"])
        if r["flaw"] == "wrong_answer":
            assert rej.group(1) == chosen.group(1)  # same (correct) reasoning
            assert 1 <= abs(int(rej.group(2)) - int(r["answer"])) <= 3
        elif r["flaw"] == "wrong_step":
            steps = _steps(rej.group(1))
            assert sum(eval(e) != v for e, v in steps) == 1  # exactly one wrong step
            assert int(rej.group(2)) == steps[-1][1] != int(r["answer"])  # carried to the answer
        elif r["flaw"] == "stops_early":  # first step only, its (right) result given as the (wrong) answer
            (expr, value), = _steps(rej.group(1))
            assert chosen.group(1).startswith(f"{expr}={value}, ") and eval(expr) == value
            assert rej.group(2) == str(value) != r["answer"]
        elif r["flaw"] == "no_reasoning":
            assert r["rejected"] == f"<answer>{r['answer']}</answer>"
        else:
            assert r["flaw"] == "broken_format" and rej is None  # tags missing or misordered
            assert chosen.group(1) in r["rejected"] and r["answer"] in r["rejected"]  # content still right


def test_preference_pairs_flaw_subset_and_unknown_flaw():
    rows = preference_pairs(6, seed=1, flaws=["no_reasoning"])
    assert {r["flaw"] for r in rows} == {"no_reasoning"}
    with pytest.raises(ValueError, match="wrong_answer"):
        preference_pairs(2, flaws=["typo"])


# ---------------------------------------------------------------------------------------- countdown


def test_countdown_rows_are_solvable_and_serialisable():
    rows = countdown_problems(200, seed=0)
    assert rows == countdown_problems(200, seed=0)
    json.dumps(rows)
    for r in rows:
        assert len(r["numbers"]) in (3, 4) and all(1 <= x <= 100 for x in r["numbers"])
        assert isinstance(r["target"], int) and 1 <= r["target"] <= 100 and r["answer"] == str(r["target"])
        assert str(r["numbers"]) in r["prompt"] and str(r["target"]) in r["prompt"] and "<answer>" in r["prompt"]
        assert countdown_check(r["solution"], r["numbers"], r["target"])
    val_keys = {(tuple(sorted(r["numbers"])), r["target"]) for r in countdown_problems(30, split="val")}
    train_keys = {(tuple(sorted(r["numbers"])), r["target"]) for r in rows}
    assert not val_keys & train_keys


def test_countdown_num_numbers_option():
    assert {len(r["numbers"]) for r in countdown_problems(20, num_numbers=3)} == {3}
    with pytest.raises(ValueError, match="num_numbers"):
        countdown_problems(2, num_numbers=1)


@pytest.mark.parametrize("equation, numbers, target, ok", [
    ("(3 + 7) * 2", [2, 3, 7], 20, True),  # 10 * 2 = 20
    ("2*(7+3)", [7, 2, 3], 20, True),  # order of numbers does not matter
    ("(3 + 7) * 2 = 20", [2, 3, 7], 20, True),  # trailing "= target" tolerated
    ("(3 + 7) * 2 = 21", [2, 3, 7], 20, False),
    ("6 / 3 * 4", [6, 3, 4], 8, True),  # 2 * 4 = 8
    ("(1 + 2) / 3 * 4", [1, 2, 3, 4], 4, True),  # 3/3 = 1, * 4
    ("10 / 4 * 2", [10, 4, 2], 5, True),  # 2.5 * 2 = 5, exact with fractions
    ("(3 + 7) * 2", [2, 3, 7], 21, False),  # wrong result
    ("(3 + 7) * 2 + 2 - 2", [2, 3, 7], 20, False),  # 2 used three times (value still 20)
    ("(3 + 7) * 2", [2, 3, 7, 5], 20, False),  # 5 not used
    ("(3 + 7) * 2", [2, 2, 3, 7], 20, False),  # one of the two 2s not used
    ("2**3", [2, 3], 8, False),  # power is not allowed (2**3 would be 8)
    ("__import__('os')", [], 0, False),
    ("(lambda: 1)()", [1], 1, False),
    ("-2 + 3 * 4", [2, 3, 4], 10, False),  # unary minus
    ("2.0 * 5", [2, 5], 10, False),  # float literal
    ("3 / (2 - 2)", [3, 2, 2], 0, False),  # division by zero
    ("", [1], 1, False),
    ("(3 + 7", [3, 7], 10, False),
])
def test_countdown_check(equation, numbers, target, ok):
    assert countdown_check(equation, numbers, target) is ok
