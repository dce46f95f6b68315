"""Bilingual arithmetic: the same questions asked in English or in Chinese, where the reasoning should stay in
the question's language (the "language mixing" that DeepSeek-R1's language-consistency reward targets).

    bilingual_arithmetic      -> {"prompt", "answer", "question", "language"}                 (RL prompts)
    bilingual_arithmetic_sft  -> {"prompt", "completion", "answer", "question", "language"}   (cold start)

Questions are those of `place_value` (`47+38`, `83-29`, `47*6`), written with numerals and the operator words of
the language: `47 plus 38` / `47加38等于多少？`. The cold-start reasoning works them by place value in words:
`<think>40 plus 30 is 70, 7 plus 8 is 15, 70 plus 15 is 85</think><answer>85</answer>`, or
`<think>40加30得70，7加8得15，70加15得85</think><answer>85</answer>`. In a share `mix_share` of the cold-start
rows the reasoning switches to the other language after its first step, as weak-model traces do; RL with
the `language` reward is meant to remove that habit (`rewards.rules.language_mixed` measures it).

Simplified: two operands only, as in `place_value`; the Chinese uses numerals, not Chinese numbers.
"""

from __future__ import annotations

import random
import re

from lightning_rlhf.data.place_value import sample_question, worked
from lightning_rlhf.data.registry import TASKS
from lightning_rlhf.data.splits import collect

WORDS = {"en": {"+": "plus", "-": "minus", "*": "times"}, "zh": {"+": "加", "-": "减", "*": "乘"}}
INSTRUCTIONS = {
    "en": "What is {question}? Think step by step in English inside <think></think>, then give only the final "
          "number inside <answer></answer>.",
    "zh": "{question}等于多少？请在<think></think>中用中文逐步思考，然后在<answer></answer>中只给出最终的数字。",
}
_STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


def say_step(step: str, language: str) -> str:
    """`40+30=70` in words: "40 plus 30 is 70" (en) or "40加30得70" (zh)."""
    a, op, b, c = _STEP.fullmatch(step.strip()).groups()
    return f"{a} {WORDS['en'][op]} {b} is {c}" if language == "en" else f"{a}{WORDS['zh'][op]}{b}得{c}"


def say_reasoning(steps: list[str], language: str, switch_to: str | None = None) -> str:
    """The steps in `language`; with `switch_to`, every step after the first in that language instead."""
    said = [say_step(s, language if i == 0 or switch_to is None else switch_to) for i, s in enumerate(steps)]
    return ("，" if language == "zh" and switch_to is None else ", ").join(said)


def _rows(n: int, seed: int, split: str, zh_share: float, mix_share: float) -> list[dict]:
    for name, share in (("zh_share", zh_share), ("mix_share", mix_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"bilingual_arithmetic: {name} must be in [0, 1], got {share}")
    rng = random.Random(seed)

    def sample() -> tuple[str, dict]:
        a, op, b = sample_question(rng, "+-*")
        language = "zh" if rng.random() < zh_share else "en"
        question = f"{a} {WORDS['en'][op]} {b}" if language == "en" else f"{a}{WORDS['zh'][op]}{b}"
        steps, answer = worked(a, op, b)
        other = "en" if language == "zh" else "zh"
        mixed = rng.random() < mix_share and steps.count(",") > 0
        reasoning = say_reasoning(steps.split(","), language, other if mixed else None)
        row = {"prompt": INSTRUCTIONS[language].format(question=question), "answer": str(answer),
               "question": question, "language": language,
               "completion": f"<think>{reasoning}</think><answer>{answer}</answer>"}
        return question, row

    return collect(n, split, sample, 0.1, "bilingual_arithmetic")


@TASKS.register("bilingual_arithmetic")
def bilingual_arithmetic(n: int, *, seed: int = 0, split: str = "train", zh_share: float = 0.5) -> list[dict]:
    """`n` prompt rows, a share `zh_share` of them asked in Chinese (see the module docstring)."""
    return [{k: v for k, v in r.items() if k != "completion"} for r in _rows(n, seed, split, zh_share, 0.0)]


@TASKS.register("bilingual_arithmetic_sft")
def bilingual_arithmetic_sft(n: int, *, seed: int = 0, split: str = "train", zh_share: float = 0.5,
                             mix_share: float = 0.3) -> list[dict]:
    """`n` cold-start rows; in a share `mix_share` the reasoning switches language after its first step."""
    return _rows(n, seed, split, zh_share, mix_share)
