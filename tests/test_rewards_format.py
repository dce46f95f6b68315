"""The `format` reward: exactly `<think>X</think><answer>Y</answer>`, nothing more, nothing less."""

import pytest

from lightning_rlhf.rewards import REWARDS, format_reward

PLAIN = "What is 12 + 4?"
PREFILL = "User: What is 12 + 4?\nAssistant: <think>"  # a chat template that pre-fills <think>


def fmt(completion: str, prompt: str = PLAIN) -> float:
    return format_reward([prompt], [completion])[0]


@pytest.mark.parametrize("completion", [
    pytest.param("<think>12+4=16</think><answer>16</answer>", id="minimal"),
    pytest.param("<think>12+4=16</think>\n\n<answer>16</answer>", id="blank-line-between"),
    pytest.param("  \n<think>\n12+4\n=16\n</think>\n<answer>\n16\n</answer>\n  ", id="whitespace-around-everything"),
    pytest.param("<think>a < b and c > d</think><answer>x > 3</answer>", id="angle-brackets-that-are-not-tags"),
])
def test_good_format_scores_one(completion):
    assert fmt(completion) == 1.0


HACKS = [
    # reasoning but no answer block
    pytest.param("<think>12+4=16</think>", id="no-answer-block"),
    # answer but no reasoning block
    pytest.param("<answer>16</answer>", id="no-think-block"),
    # blocks in the wrong order
    pytest.param("<answer>16</answer><think>12+4</think>", id="wrong-order"),
    # empty reasoning
    pytest.param("<think> \n </think><answer>16</answer>", id="empty-think"),
    # empty answer
    pytest.param("<think>12+4</think><answer>\n</answer>", id="empty-answer"),
    # text after the answer block
    pytest.param("<think>12+4</think><answer>16</answer> Hope this helps!", id="trailing-text"),
    # text before the reasoning block
    pytest.param("Sure! <think>12+4</think><answer>16</answer>", id="leading-text"),
    # text between the blocks
    pytest.param("<think>12+4</think> so <answer>16</answer>", id="text-between-blocks"),
    # two answer blocks
    pytest.param("<think>x</think><answer>16</answer><answer>17</answer>", id="repeated-answer"),
    # two think blocks
    pytest.param("<think>x</think><think>y</think><answer>16</answer>", id="repeated-think"),
    # an answer block nested inside the reasoning, plus the real one
    pytest.param("<think>x <answer>17</answer></think><answer>16</answer>", id="answer-nested-in-think"),
    # a think tag nested inside the answer
    pytest.param("<think>x</think><answer><think>16</think></answer>", id="think-nested-in-answer"),
    # tag variants in another case that a lenient regex would skip
    pytest.param("<think>x</think><answer>16</answer><ANSWER>17</ANSWER>", id="uppercase-extra-tags"),
    # spaced tag variants
    pytest.param("<think>x < /think></think><answer>16</answer>", id="spaced-tag-variant"),
    # unclosed answer block
    pytest.param("<think>x</think><answer>16", id="unclosed-answer"),
    # an empty string
    pytest.param("", id="empty-completion"),
]


@pytest.mark.parametrize("completion", HACKS)
def test_format_hacks_score_zero(completion):
    assert fmt(completion) == 0.0


def test_prefilled_think():
    # With <think> pre-filled by the prompt, the completion starts inside the reasoning...
    assert fmt("12+4=16</think><answer>16</answer>", PREFILL) == 1.0
    # ...so a completion that writes its own <think> again has two and fails,
    assert fmt("<think>12+4=16</think><answer>16</answer>", PREFILL) == 0.0
    # ...and without the prefill the same bare completion has no opening tag and fails.
    assert fmt("12+4=16</think><answer>16</answer>", PLAIN) == 0.0


def test_batch_and_registry():
    reward = REWARDS.get("format")
    assert reward([PLAIN] * 3, ["<think>a</think><answer>1</answer>", "1", "<think>a</think>"], answer=["1"] * 3) == [
        1.0, 0.0, 0.0]
