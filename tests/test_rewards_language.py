"""The `language` reward: share of the reasoning written in the target language (DeepSeek-R1)."""

import pytest

from lightning_rlhf.rewards import REWARDS, LanguageConsistency, language_shares

EN_PROMPT = "What is twelve plus four?"
ZH_PROMPT = "十二加四等于多少？"


def score(completion: str, target: str = "auto", prompt: str = EN_PROMPT) -> float:
    return LanguageConsistency(target)([prompt], [completion])[0]


def test_english_reasoning():
    assert score("<think>We add twelve and four.</think><answer>16</answer>", "en") == 1.0
    assert score("<think>We add twelve and four.</think><answer>16</answer>", "zh") == 0.0


def test_chinese_reasoning():
    assert score("<think>我们把十二和四相加。</think><answer>16</answer>", "zh") == 1.0
    assert score("<think>我们把十二和四相加。</think><answer>16</answer>", "en") == 0.0


def test_mixed_half_half():
    # Units: Han characters 我 们 相 加 = 4 zh; Latin words "we", "add", "two", "numbers" = 4 en.
    # zh share = 4 / (4 + 4) = 0.5, en share = 4 / 8 = 0.5.
    completion = "<think>我们相加 we add two numbers</think><answer>16</answer>"
    assert score(completion, "zh") == pytest.approx(0.5)
    assert score(completion, "en") == pytest.approx(0.5)


def test_mixed_uneven_with_neutral_math():
    # "12 + 4 = 16", "$x^2$", "\frac" and the single letter "x" are neutral.
    # Units: 计 算 = 2 zh; "then", "check", "it" = 3 en -> zh share 2 / 5 = 0.4.
    completion = "<think>计算 12 + 4 = 16 $x^2$ \\frac{1}{2} x then check it.</think><answer>16</answer>"
    assert score(completion, "zh") == pytest.approx(0.4)
    assert score(completion, "en") == pytest.approx(0.6)


def test_other_scripts_count_against_the_target():
    # Units: "We", "add" = 2 en; "складываем" = 1 other -> en share 2 / 3.
    assert score("<think>We add складываем</think><answer>1</answer>", "en") == pytest.approx(2 / 3)


def test_only_reasoning_counts():
    # The answer block is not reasoning: English reasoning with a Chinese answer is fully English.
    assert score("<think>We add them.</think><answer>十六</answer>", "en") == 1.0


def test_all_neutral_reasoning_is_one():
    # Digits and operators belong to no language: nothing in the reasoning is mixed.
    assert score("<think>12 + 4 = 16</think><answer>16</answer>", "zh") == 1.0


# Each case would pay 1.0 (or a high share) to a grader that forgives missing reasoning or reads outside it.
HACKS = [
    pytest.param("<think></think><answer>5</answer>", "en", 0.0, id="empty-think"),
    pytest.param("<answer>5</answer>", "en", 0.0, id="no-think-block"),
    pytest.param("", "en", 0.0, id="empty-completion"),
    pytest.param("<think>   \n\t </think><answer>5</answer>", "en", 0.0, id="whitespace-think"),
    pytest.param("We add them. <answer>5</answer>", "en", 0.0, id="reasoning-without-tags"),
    pytest.param("<think>We add them. <answer>5</answer>", "en", 0.0, id="unclosed-think"),
    pytest.param("</think>We add them.<think><answer>5</answer>", "en", 0.0, id="tags-reversed"),
    # English padding after the reasoning does not dilute Chinese reasoning for an English target
    pytest.param("<think>我们相加</think> We add them all. <answer>5</answer>", "en", 0.0, id="padding-outside-think"),
    # a second think block of the right language does not wash out the first
    pytest.param("<think>我们相加</think><think>We add.</think><answer>5</answer>", "en", 0.0, id="second-think-block"),
    # chat markers and tags are neutral: they cannot make up an English share
    pytest.param("<think><|im_start|>assistant 我们</think><answer>5</answer>", "en", 0.0, id="chat-markers-neutral"),
    # single Latin letters (variables) are neutral, so "x y z" cannot pass as English
    pytest.param("<think>x y z 相加</think><answer>5</answer>", "en", 0.0, id="single-letters-neutral"),
    # LaTeX commands are neutral: \text-free English words inside math do not count either way
    pytest.param("<think>$\\frac{a}{b}$ 相加</think><answer>5</answer>", "en", 0.0, id="latex-neutral"),
]


@pytest.mark.parametrize("completion, target, expected", HACKS)
def test_language_hacks(completion, target, expected):
    assert score(completion, target) == pytest.approx(expected)


def test_auto_target_follows_the_prompt():
    chinese, english = "<think>我们相加。</think><answer>16</answer>", "<think>We add.</think><answer>16</answer>"
    assert score(chinese, "auto", ZH_PROMPT) == 1.0
    assert score(english, "auto", ZH_PROMPT) == 0.0
    assert score(english, "auto", EN_PROMPT) == 1.0
    assert score(chinese, "auto", EN_PROMPT) == 0.0
    # Chat-template markers such as <|im_start|>user are not English words: the prompt stays Chinese.
    assert score(chinese, "auto", "<|im_start|>user\n十二加四？<|im_end|>\n<|im_start|>assistant\n") == 1.0


def test_prefilled_think_reads_reasoning_only():
    # Prompt ends with <think>; reasoning is everything before </think> in the completion.
    assert score("We add.</think><answer>十六</answer>", "en", "Q: 12+4? <think>") == 1.0


def test_unit_counts():
    assert language_shares("Hello world, 你好! x = 3") == {"zh": 2, "en": 2, "other": 0}


def test_bad_target_and_registry():
    with pytest.raises(ValueError, match="unknown target 'fr'.*en, zh, auto"):
        LanguageConsistency("fr")
    assert REWARDS.get("language") is LanguageConsistency
