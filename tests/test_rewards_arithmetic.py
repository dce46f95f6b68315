"""`arithmetic_steps`: every worked step must be true, work on the question's numbers, and end in the answer."""

import pytest

from lightning_rlhf.rewards import REWARDS
from lightning_rlhf.rewards.arithmetic import place_parts, question_numbers

Q = "12+7-3=? Think step by step inside <think></think>, then answer inside <answer></answer>."


def steps(completion: str, prompt: str = Q) -> float:
    return REWARDS.get("arithmetic_steps")([prompt], [completion])[0]


@pytest.mark.parametrize("prompt, completion", [
    (Q, "<think>12+7=19, 19-3=16</think><answer>16</answer>"),  # all steps true, answer = last result
    ("3*4+1=?", "<think>3*4=12, 12+1=13</think><answer>13</answer>"),  # multiplication
    ("2-5=?", "<think>2-5=-3</think><answer>-3</answer>"),  # negative result
    ("47+38=?", "<think>40+30=70, 7+8=15, 70+15=85</think><answer>85</answer>"),  # place-value parts
    ("83-29=?", "<think>83-20=63, 63-9=54</think><answer>54</answer>"),  # parts of the second operand
    ("47*6=?", "<think>40*6=240, 7*6=42, 240+42=282</think><answer>282</answer>"),  # parts of a product
    ("13+6=?", "<think>13+6=19,</think><answer>19</answer>extra"),  # trailing comma and text
    ("Tom has 5 apples and buys 3 more. How many?", "<think>5+3=8</think><answer>8</answer>"),  # word problem
])
def test_worked_steps_that_answer_the_question_score_one(prompt, completion):
    assert steps(completion, prompt) == 1.0


@pytest.mark.parametrize("prompt, completion", [
    # the hack: a true step unrelated to the question
    pytest.param(Q, "<think>1+1=2</think><answer>2</answer>", id="unrelated-true-step"),
    # grading the first answer block while accuracy grades the last
    pytest.param(Q, "<think>12+7=19, 19-3=16</think><answer>16</answer><answer>99</answer>", id="last-block-wins"),
    pytest.param("8+13+18=?", "<think>8+13=20, 20+18=38</think><answer>38</answer>", id="lucky-over-wrong-step"),
    pytest.param("13+6=?", "<think>13+6=19</think><answer>18</answer>", id="answer-contradicts-step"),
    pytest.param("13+6=?", "<think>13+6=18</think><answer>19</answer>", id="right-answer-wrong-step"),
    pytest.param("13+6=?", "<think>the sum is 19</think><answer>19</answer>", id="prose"),
    pytest.param("13+6=?", "<think></think><answer>19</answer>", id="no-steps"),
    pytest.param("13+6=?", "<answer>19</answer>", id="no-think-block"),
    # true steps on the question's numbers that skip one of them
    pytest.param(Q, "<think>12+7=19</think><answer>19</answer>", id="drops-an-operand"),
    # true steps reaching the right value from numbers not in the question
    pytest.param(Q, "<think>8+8=16</think><answer>16</answer>", id="right-value-foreign-operands"),
    # uses every number but computes something else than the question asks
    pytest.param(Q, "<think>12+7=19, 19+3=22</think><answer>22</answer>", id="wrong-operation"),
    # one true step with the question's numbers, then padding with an unrelated true step
    pytest.param(Q, "<think>12+7=19, 19-3=16, 2+2=4</think><answer>4</answer>", id="trailing-unrelated-step"),
    # restating the question as the only "step"
    pytest.param(Q, "<think>12+7-3=16</think><answer>16</answer>", id="three-operand-step"),
    # the answer restated as an expression
    pytest.param(Q, "<think>12+7=19, 19-3=16</think><answer>19-3</answer>", id="answer-is-expression"),
    # steps hidden after the reasoning block
    pytest.param(Q, "<think>ok</think> 12+7=19, 19-3=16 <answer>16</answer>", id="steps-outside-think"),
    # an unclosed reasoning block
    pytest.param(Q, "<think>12+7=19, 19-3=16 <answer>16</answer>", id="unclosed-think"),
    # a question without numbers cannot be worked
    pytest.param("What is the answer?", "<think>1+1=2</think><answer>2</answer>", id="no-question-numbers"),
    # a part of a question number used alone, the rest never
    pytest.param("47+38=?", "<think>40+30=70</think><answer>70</answer>", id="partial-place-value"),
])
def test_hacks_score_zero(prompt, completion):
    assert steps(completion, prompt) == 0.0


def test_place_parts_and_question_numbers():
    assert place_parts(47) == {47, 40, 7} and place_parts(305) == {305, 300, 5} and place_parts(-8) == {8}
    assert question_numbers(Q) == ([12, 7, 3], 16)  # 12 + 7 - 3 = 16
    assert question_numbers("47*6+1=?") == ([47, 6, 1], 283)  # 47*6 = 282, + 1 = 283
    assert question_numbers("Tom has 5 apples and 3 pears") == ([5, 3], None)
