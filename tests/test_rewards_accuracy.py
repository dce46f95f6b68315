"""The `accuracy` reward: correct answers in many notations score 1, reward hacks score 0."""

import threading

import pytest

from lightning_rlhf.rewards import REWARDS, AccuracyReward, accuracy_reward, extract_answer

Q = "What is 12 + 4? Think in <think></think>, answer in <answer></answer>."


def acc(completion: str, gold: str, prompt: str = Q) -> float:
    return accuracy_reward([prompt], [completion], answer=[gold])[0]


# ------------------------------------------------------------------ correct answers score 1

POSITIVE = [
    pytest.param("<think>12+4=16</think><answer>16</answer>", "16", id="integer"),
    pytest.param("<think>4-7=-3</think><answer>-3</answer>", "-3", id="negative"),
    pytest.param("<think>half</think><answer>0.5</answer>", "1/2", id="decimal-vs-fraction-gold"),
    pytest.param("<think>half</think><answer>1/2</answer>", "0.5", id="fraction-vs-decimal-gold"),
    pytest.param("<think>half</think><answer>\\frac{1}{2}</answer>", "0.5", id="latex-frac"),
    pytest.param("<think>half</think><answer>$\\frac{1}{2}$</answer>", "\\frac{1}{2}", id="latex-both-sides"),
    pytest.param("<think>x</think><answer>\\boxed{16}</answer>", "16", id="boxed-inside-answer"),
    pytest.param("12 + 4 is \\boxed{16}.", "16", id="boxed-without-answer-tags"),
    pytest.param("<think>x</think> \\boxed{1} then \\boxed{16}", "16", id="last-boxed-wins"),
    pytest.param("\n <think>\n 12+4 \n</think>\n\n<answer>\n  16 \n</answer>\n\n", "16", id="whitespace-newlines"),
    pytest.param("<think>x</think><answer>16.0</answer>", "16", id="trailing-zero-decimal"),
    pytest.param("<think>x</think><answer>x = 16</answer>", "16", id="variable-assignment"),
    pytest.param("<think>x</think><answer>1,000</answer>", "1000", id="thousands-separator"),
    pytest.param("<think>x</think><answer>\\$16</answer>", "16", id="currency-dollar"),
    pytest.param("<think>x</think><answer>\\sqrt{2}</answer>", "\\sqrt{2}", id="expression-when-gold-is-one"),
    pytest.param("<think>x</think><answer>\\dfrac{1}{2}</answer>", "0.5", id="dfrac-is-a-number"),
    pytest.param("<think>x</think><answer>$16$</answer>", "16", id="dollar-math"),
    pytest.param("<think>x</think><answer>(1, 2)</answer>", "(1, 2)", id="tuple-when-gold-is-a-tuple"),
    pytest.param("<think>x</think><answer>15</answer><answer>16</answer>", "16", id="last-answer-block-wins"),
]


@pytest.mark.parametrize("completion,gold", POSITIVE)
def test_correct_answers_score_one(completion, gold):
    assert acc(completion, gold) == 1.0


@pytest.mark.parametrize("completion,gold", [
    pytest.param("<think>x</think><answer>17</answer>", "16", id="wrong-integer"),
    pytest.param("<think>x</think><answer>16</answer>", "-16", id="sign-matters"),
    pytest.param("<think>x</think><answer>0.51</answer>", "1/2", id="near-but-wrong-decimal"),
])
def test_wrong_answers_score_zero(completion, gold):
    assert acc(completion, gold) == 0.0


# ------------------------------------------------------------------ reward hacks score 0
# Every case has gold "16" and contains the string "16" somewhere, so a lenient grader would pay it.

LONG_THINK = "<think>" + "12+4=16. " * 5_000 + "</think><answer>16</answer>"  # 45,007 chars

HACKS = [
    # no answer tag at all, the number just appears in prose
    pytest.param("<think>12+4</think> The answer is 16.", id="no-answer-tag"),
    # empty answer block after the right number was computed in the reasoning
    pytest.param("<think>12+4=16</think><answer>  </answer>", id="empty-answer"),
    # hedging with two candidates joined by "or"
    pytest.param("<think>x</think><answer>16 or 17</answer>", id="hedge-or"),
    # hedging with a comma list
    pytest.param("<think>x</think><answer>16, 17</answer>", id="hedge-comma"),
    # hedging inside LaTeX text
    pytest.param("<think>x</think><answer>16 \\text{ or } 17</answer>", id="hedge-latex-text"),
    # hedging as a set, which math-verify would compare as a set
    pytest.param("<think>x</think><answer>\\{16, 17\\}</answer>", id="hedge-set"),
    # hedging with plus-minus
    pytest.param("<think>x</think><answer>17 \\pm 1</answer>", id="hedge-pm"),
    # two candidates on separate lines
    pytest.param("<think>x</think><answer>16\n17</answer>", id="hedge-newline"),
    # two boxed candidates inside one answer block
    pytest.param("<think>x</think><answer>\\boxed{16} \\boxed{17}</answer>", id="hedge-two-boxes"),
    # "a = b" with numbers on both sides: whichever side the grader reads
    pytest.param("<think>x</think><answer>17 = 16</answer>", id="hedge-number-equation"),
    # listing every number from 0 to 99, separated by spaces
    pytest.param("<think>x</think><answer>" + " ".join(map(str, range(100))) + "</answer>", id="list-spaces"),
    # listing every number from 0 to 99, separated by commas
    pytest.param("<think>x</think><answer>" + ",".join(map(str, range(100))) + "</answer>", id="list-commas"),
    # the answer only inside the reasoning, nothing after </think>
    pytest.param("<think>so <answer>16</answer></think>", id="answer-only-in-think"),
    # boxed only inside the reasoning
    pytest.param("<think>it is \\boxed{16}</think> done", id="boxed-only-in-think"),
    # an unclosed <think> swallows everything after it
    pytest.param("<think>12+4 <answer>16</answer>", id="unclosed-think"),
    # code injection in the answer block
    pytest.param("<think>x</think><answer>__import__('os').system('echo') or 16</answer>", id="code-injection-python"),
    # shell/SQL-style injection
    pytest.param("<think>x</think><answer>16; rm -rf /</answer>", id="code-injection-semicolon"),
    # the question's own expression handed back instead of an answer
    pytest.param("<think>x</think><answer>12 + 4</answer>", id="echo-question-expression"),
    # an extremely long completion (45k chars) past the input cap
    pytest.param(LONG_THINK, id="extremely-long-completion"),
    # a very long answer block (padding around the number)
    pytest.param("<think>x</think><answer>" + " " * 50 + "+" * 300 + "16</answer>", id="extremely-long-answer"),
    # an answer block opened again after the last closed one (two different answers)
    pytest.param("<think>x</think><answer>16</answer><answer>17", id="reopened-answer-block"),
    # nested answer tags inside the block
    pytest.param("<think>x</think><answer><answer>16</answer></answer>", id="nested-answer-tags"),
    # unbalanced boxed braces
    pytest.param("the answer is \\boxed{16", id="unbalanced-boxed"),
    # prose with units: the block must hold one expression
    pytest.param("<think>x</think><answer>16 apples, or maybe 17</answer>", id="prose-in-answer"),
]


@pytest.mark.parametrize("completion", HACKS)
def test_reward_hacks_score_zero(completion):
    assert acc(completion, "16") == 0.0


def test_answer_only_in_echoed_prompt_scores_zero():
    # A few-shot prompt that contains an answer block; the model just copies the prompt back.
    prompt = "Example: <think>8+8=16</think><answer>16</answer>\nNow: what is 12 + 4?"
    assert acc(prompt, "16", prompt=prompt) == 0.0
    # ...but the same prompt followed by a real answer still counts.
    assert acc(prompt + " <think>12+4=16</think><answer>16</answer>", "16", prompt=prompt) == 1.0


def test_prefilled_think_is_restored():
    # The chat template ends the prompt with <think>; the completion starts inside the reasoning.
    prompt = "User: what is 12 + 4?\nAssistant: <think>"
    assert acc("12+4=16</think><answer>16</answer>", "16", prompt=prompt) == 1.0
    # An answer written before </think> is still reasoning.
    assert acc("<answer>16</answer> hmm", "16", prompt=prompt) == 0.0


def test_caps_are_configurable():
    reward = AccuracyReward(max_completion_chars=100_000)
    assert reward([Q], [LONG_THINK], answer=["16"]) == [1.0]  # 45,007 chars < 100,000


def test_batch_gold_types_and_registry():
    # The registry name builds the same reward; numeric gold values are accepted.
    reward = REWARDS.get("accuracy")()
    out = reward([Q] * 3, ["<answer>16</answer>", "<answer>2.5</answer>", "<answer>7</answer>"], answer=[16, 2.5, "8"])
    assert out == [1.0, 1.0, 0.0]


def test_missing_answer_column_names_it():
    with pytest.raises(ValueError, match="'answer' column"):
        accuracy_reward([Q], ["<answer>16</answer>"])


def test_works_outside_the_main_thread():
    # math-verify's signal-based timeout would fail in a thread; the reward must not.
    result = {}

    def worker():
        result["scores"] = accuracy_reward([Q, Q], ["<answer>\\frac{1}{2}</answer>", "<answer>15</answer>"],
                                           answer=["0.5", "16"])

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=30)
    assert result["scores"] == [1.0, 0.0]


def test_extract_answer_rules():
    assert extract_answer("<think>a</think><answer> 16 </answer>") == "16"
    assert extract_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"  # nested braces balanced
    assert extract_answer("<answer>16") is None  # answer tag without a closed block: no boxed fallback
    assert extract_answer("<think>a</think>nothing here") is None


# ------------------------------------------------------------------ countdown


def test_countdown_reward():
    countdown = REWARDS.get("countdown")
    completions = [
        "<think>3+7=10, 10*2=20</think><answer>(3 + 7) * 2</answer>",  # uses 3, 7, 2 once: 20 -> 1
        "<think>x</think><answer>(3 + 7) * 2 = 20</answer>",  # trailing "= target" tolerated -> 1
        "<think>x</think><answer>10 * 2</answer>",  # 10 is not one of the numbers -> 0
        "<think>(3 + 7) * 2</think><answer></answer>",  # equation only in the reasoning -> 0
        "<think>x</think><answer>__import__('os')</answer>",  # code, never evaluated -> 0
    ]
    n = len(completions)
    scores = countdown(["Use 3 7 2 to make 20"] * n, completions, numbers=[[3, 7, 2]] * n, target=[20] * n)
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'numbers' and 'target'"):
        countdown(["p"], ["<answer>1</answer>"], answer=["1"])


# ------------------------------------------------------------------ the question restated is not an answer
# Gold "16" for "12+7-3=?": each answer below is worth 16 but is an expression, not a number. When the gold
# answer is a plain number, the answer must be one (an integer, a decimal or a fraction of two integers).

QR = "12+7-3=? Think inside <think></think>, then answer inside <answer></answer>."

RESTATED = [
    pytest.param("(12+7-3)", id="parenthesised-question"),
    pytest.param("7+12-3", id="reordered-question"),
    pytest.param("12+7-3+0", id="question-plus-zero"),
    pytest.param("12+7-3", id="literal-question"),
    pytest.param("19-3", id="last-step-unevaluated"),
    pytest.param("8*2", id="product-worth-16"),
    pytest.param("4^2", id="power-worth-16"),
    pytest.param("\\sqrt{256}", id="root-worth-16"),
    pytest.param("32/2", id="fraction-reducing-to-16"),
    pytest.param("(16)", id="parenthesised-number"),
    pytest.param("16+0", id="number-plus-zero"),
    pytest.param("--16", id="double-negation"),
    pytest.param("\\boxed{8+8}", id="boxed-expression"),
    pytest.param("x = 12+7-3", id="assignment-of-the-question"),
]


@pytest.mark.parametrize("answer", RESTATED)
def test_an_expression_worth_the_gold_number_scores_zero(answer):
    assert acc(f"<think>12+7=19, 19-3=16</think><answer>{answer}</answer>", "16", QR) == 0.0


@pytest.mark.parametrize("answer", ["16", "16.0", "x = 16", "\\boxed{16}", "$16$"])
def test_the_number_itself_still_scores_one(answer):
    assert acc(f"<think>12+7=19, 19-3=16</think><answer>{answer}</answer>", "16", QR) == 1.0
