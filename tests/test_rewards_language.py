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


def test_only_reasoning_counts_and_no_think_uses_whole_text():
    # The answer block is not reasoning: English reasoning with a Chinese answer is fully English.
    assert score("<think>We add them.</think><answer>十六</answer>", "en") == 1.0
    # Without a think block the whole completion counts (tags are neutral):
    # "The", "sum", "is" = 3 en; 十 六 = 2 zh -> en 3 / 5 = 0.6.
    assert score("The sum is 十六 <answer>16</answer>", "en") == pytest.approx(0.6)


def test_all_neutral_is_one():
    assert score("<think>12 + 4 = 16</think><answer>16</answer>", "zh") == 1.0
    assert score("", "en") == 1.0


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
