"""`arithmetic_steps`: every worked step must be true and the answer must be the last step's result."""

import pytest

from lightning_rlhf.rewards import REWARDS

CASES = [
    ("<think>12+7=19, 19-3=16</think><answer>16</answer>", 1.0),  # all steps true, answer = last result
    ("<think>3*4=12, 12+1=13</think><answer>13</answer>", 1.0),  # multiplication
    ("<think>2-5=-3</think><answer>-3</answer>", 1.0),  # negative result
    ("<think>8+13=20, 20+18=39</think><answer>39</answer>", 0.0),  # lucky answer over a wrong step (8+13 is 21)
    ("<think>13+6=19</think><answer>18</answer>", 0.0),  # answer contradicts the last step
    ("<think>13+6=18</think><answer>19</answer>", 0.0),  # right answer, wrong step
    ("<think>the sum is 19</think><answer>19</answer>", 0.0),  # prose instead of steps
    ("<think></think><answer>19</answer>", 0.0),  # no steps
    ("<answer>19</answer>", 0.0),  # no think block
    ("<think>13+6=19,</think><answer>19</answer>extra", 1.0),  # trailing comma and text: steps still checked
]


@pytest.mark.parametrize("completion, expected", CASES)
def test_arithmetic_steps(completion, expected):
    assert REWARDS.get("arithmetic_steps")(["q"], [completion]) == [expected]
