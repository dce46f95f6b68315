"""Rule-based rewards: answer accuracy, R1 output format, language consistency, Countdown.

All follow `(prompts, completions, **columns) -> list[float]` and are registered in `REWARDS`.

- `accuracy` (1/0): the final answer is the content of the LAST well-formed `<answer>...</answer>`
  block outside the reasoning (or, when the answer region has no answer tags at all, the last
  `\\boxed{...}` with balanced braces), checked against the `answer` column with math-verify.
- `format` (1/0): exactly `<think>X</think> <answer>Y</answer>`, each tag once, X and Y non-empty.
- `language` (0..1): share of the reasoning's words in the target language (DeepSeek-R1); 0 when there is
  no `<think>` block or it is empty, 1 when it holds only neutral text (digits, operators, LaTeX).
- `countdown` (1/0): the answer is an equation that `countdown_check` accepts.
- `language_mixed(prompt, completion)` (a measure, not a reward): the reasoning uses two or more languages.

Simplifications, chosen to make reward hacking hard rather than to be lenient:
- The answer block must hold ONE mathematical expression. Prose words (other than math function
  names like `sin`, `log`) score 0, even units such as `\\text{cm}`; that is where hedges ("16 or 17")
  and injected code hide. Several values (commas, `\\pm`, two boxes, numbers separated only by
  spaces) score 0 unless the gold answer has the same kind of list.
- Completions longer than `max_completion_chars` and answers longer than `max_answer_chars` score 0
  (nothing is graded past a cap), which also bounds math-verify's work where it cannot time out.
- math-verify's signal-based timeout only works in the main thread; elsewhere (threads) it runs
  without one and the caps above stand in for it. DataLoader worker processes have their own main
  thread, so they keep the timeout.
- When the gold answer is a plain number (`16`, `-3`, `0.5`), the answer must be a number too: an
  integer, a decimal or a fraction of two integers (`1/2`, `\\frac{1}{2}`), optionally as `x = ...` or
  boxed. An expression worth the same (`7+12-3`, `(12+7-3)`, `\\sqrt{4}`) restates the question and scores 0.
- Language counts Han characters (zh) against Latin-letter words (en); other scripts count against
  both; single Latin letters (math variables), digits, LaTeX and punctuation are neutral.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from typing import Any

from lightning_rlhf.rewards.registry import REWARDS

MAX_COMPLETION_CHARS = 20_000
MAX_ANSWER_CHARS = 200
MIN_ECHO_CHARS = 16  # a verbatim prompt copy at least this long is removed before grading
MATH_TIMEOUT_S = 5

# Any think/answer tag, in any case and spacing: used to reject tag variants and nesting.
_TAG_RE = re.compile(r"<\s*/?\s*(?:think|answer)\s*>", re.IGNORECASE)
_FORMAT_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)


# ---------------------------------------------------------------- answer extraction


def _apply_prefill(prompt: str, completion: str) -> str:
    """A chat template that ends the prompt with `<think>` pre-fills it: put it back in front."""
    return "<think>" + completion if prompt.rstrip().endswith("<think>") else completion


def _strip_prompt_echo(prompt: str, completion: str) -> str:
    p = prompt.strip()
    return completion.replace(p, " ") if len(p) >= MIN_ECHO_CHARS and p in completion else completion


def _answer_region(text: str) -> str:
    """Text outside the reasoning: after the last `</think>`, cut at any `<think>` left open."""
    close = text.rfind("</think>")
    region = text[close + len("</think>"):] if close >= 0 else text
    opened = region.find("<think>")
    return region[:opened] if opened >= 0 else region


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced


def extract_answer(completion: str, prompt: str = "", max_chars: int = MAX_COMPLETION_CHARS) -> str | None:
    """The final answer of a completion (stripped), or None when there is no well-formed one.

    Order: drop a verbatim echo of the prompt, restore a pre-filled `<think>`, keep only the text
    after the reasoning, then take the last `<answer>...</answer>` block; a block left open after it,
    or tags inside it, make it None. Only when the region has no answer tags is `\\boxed{}` used.
    """
    if len(completion) > max_chars:
        return None
    region = _answer_region(_apply_prefill(prompt, _strip_prompt_echo(prompt, completion)))
    if "<answer>" in region or "</answer>" in region:
        end = region.rfind("</answer>")
        start = region.rfind("<answer>", 0, max(end, 0))
        if end < 0 or start < 0 or "<answer>" in region[end:]:
            return None
        body = region[start + len("<answer>") : end]
        return None if _TAG_RE.search(body) else body.strip()
    boxed = _last_boxed(region)
    return None if boxed is None else boxed.strip()


# ---------------------------------------------------------------- answer validation

_ALLOWED_CHARS = re.compile(r"[0-9A-Za-z\s+\-*/^=.,(){}\[\]\\$%!<>|:_−×÷·π√°]*")
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt pi inf infty "
    "mod deg max min gcd lcm".split()
)
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\\,)(?=\d{3}(?!\d))")
_MULTI_COMMANDS = re.compile(r"\\(?:pm|mp|lor|vee|cup|quad|qquad|hspace|newline)(?![A-Za-z])|\\\\")
_GAP_NOISE = re.compile(r"\s|\$|\\[,! ]|\\(?:text|mathrm|textbf|mathbf|left|right|displaystyle)(?![A-Za-z])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_OPERATOR_BETWEEN = re.compile(r"[\d)}]\s*(?:[+\-*/^×÷·]|\\times|\\cdot|\\div)\s*[\d({\\]")


def _normalize(s: str) -> str:
    """Drop thousands separators ("1,000", "1\\,000") and currency dollars ("\\$16")."""
    return _THOUSANDS.sub("", s.strip()).replace("\\$", "")


def _multi_markers(s: str) -> set[str]:
    """Which kinds of 'several values' an answer shows (empty set for a single expression)."""
    kinds = set()
    if _MULTI_COMMANDS.search(s):
        kinds.add("command")
    if "," in s or ";" in s:
        kinds.add("list")
    if s.count("\\boxed") > 1:
        kinds.add("boxes")
    if s.count("=") > 1:
        kinds.add("equations")
    nums = list(_NUMBER.finditer(s))
    for a, b in zip(nums, nums[1:]):
        gap = _GAP_NOISE.sub("", s[a.end() : b.start()])
        if "}{" not in gap and all(ch in "(){}[]" for ch in gap):
            kinds.add("juxtaposed")  # "16 17", "16\n17", "(1)(2)": only spacing between numbers
    return kinds


def _is_single_expression(ans: str, gold: str, prompt: str, max_answer_chars: int) -> bool:
    if not ans or len(ans) > max_answer_chars or not _ALLOWED_CHARS.fullmatch(ans):
        return False
    words = re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", ans))
    if any(w.lower() not in _MATH_WORDS for w in words):
        return False  # prose: "16 or 17", "import os", "\text{apples}"
    if _multi_markers(ans) - _multi_markers(gold):
        return False
    lhs = ans.split("=")[0] if "=" in ans else None
    if lhs is not None and re.search(r"\d", lhs) and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", lhs)):
        return False  # "16 = 17": a number on the left is a hedge or a shown sum, not "x = answer"
    squash = lambda s: re.sub(r"\s|\$", "", s)  # noqa: E731
    if _OPERATOR_BETWEEN.search(ans) and squash(ans) != squash(gold) and squash(ans) in squash(prompt):
        return False  # the question's own expression handed back ("12+4" for "What is 12+4?")
    return True


# ---------------------------------------------------------------- math-verify


def _timeout() -> int | None:
    """math-verify times out with signal.alarm, which only works in the main thread."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(expr: str, timeout: int | None) -> list:
    from math_verify import parse

    wrapped = expr if ("$" in expr or "\\boxed" in expr) else f"${expr}$"
    return parse(wrapped, parsing_timeout=timeout) or parse(expr, parsing_timeout=timeout)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> list:
    return _parse(gold, timeout)


def _math_equal(gold: str, pred: str) -> bool:
    from math_verify import verify

    timeout = _timeout()
    gold_parsed, pred_parsed = _parse_gold(gold, timeout), _parse(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


# ---------------------------------------------------------------- rewards


_PLAIN_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+\-−]?\d+(?:\.\d+)?")
_FRACTION = re.compile(r"[+\-−]?(?:(\d+)/(\d+)|\\[dt]?frac\{(\d+)\}\{(\d+)\}|\\[dt]?frac(\d)(\d))")
_WRAPPERS = re.compile(r"^\\(?:boxed|text|mathrm|mathbf|textbf)\{(.*)\}$", re.DOTALL)


def is_number_answer(answer: str) -> bool:
    """True for a number written as one: `16`, `-3`, `0.5`, a fraction in lowest terms (`1/2`, `\\frac{1}{2}`),
    also as `x = 16`, `$16$` or `\\boxed{16}`; False for any other expression (`7+12-3`, `(16)`, `\\sqrt{4}`,
    `16+0`, `32/2`)."""
    s = re.sub(r"\s|\$", "", answer)
    s = re.sub(r"^[A-Za-z]=", "", s)
    while (m := _WRAPPERS.match(s)) is not None:
        s = m.group(1)
    if _DECIMAL.fullmatch(s):
        return True
    m = _FRACTION.fullmatch(s)
    if m is None:
        return False
    num, den = (int(g) for g in m.groups() if g is not None)
    return den > 1 and math.gcd(num, den) == 1  # "32/2" is a division still to do, "1/2" a number


@REWARDS.register("accuracy")
class AccuracyReward:
    """1.0 when the extracted final answer equals the `answer` column mathematically, else 0.0."""

    def __init__(self, max_completion_chars: int = MAX_COMPLETION_CHARS, max_answer_chars: int = MAX_ANSWER_CHARS):
        self.max_completion_chars = max_completion_chars
        self.max_answer_chars = max_answer_chars

    def __call__(self, prompts: list[str], completions: list[str], answer: list[Any] | None = None, **_) -> list[float]:
        if answer is None:
            raise ValueError("the 'accuracy' reward needs an 'answer' column in the prompt dataset "
                             "(the gold final answer)")
        return [self.score(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    def unscorable(self, row: dict[str, Any]) -> str | None:
        """Why no completion can ever score 1 on `row` (its gold answer is not one mathematical expression, so a
        prediction equal to it is rejected as prose or a list), else None. Read before training, to drop and count
        such rows instead of training on all-zero rewards."""
        gold = _normalize("" if row.get("answer") is None else str(row["answer"]))
        if gold and _is_single_expression(gold, gold, "", self.max_answer_chars):
            return None
        return (f"the 'accuracy' reward can never match its answer {str(row.get('answer'))[:60]!r} (it grades one "
                "number or math expression, never prose: write it as e.g. 16, or map `answer` to the column that "
                "holds the final answer)")

    def score(self, prompt: str, completion: str, gold: Any) -> float:
        gold_s = _normalize("" if gold is None else str(gold))
        pred = extract_answer(completion, prompt, self.max_completion_chars)
        if not gold_s or pred is None:
            return 0.0
        pred = _normalize(pred)
        if not _is_single_expression(pred, gold_s, prompt, self.max_answer_chars):
            return 0.0
        if _PLAIN_NUMBER.fullmatch(gold_s) and not is_number_answer(pred):
            return 0.0  # the question restated ("7+12-3", "(12+7-3)") is not an answer
        return 1.0 if _math_equal(gold_s, pred) else 0.0


accuracy_reward = AccuracyReward()


def _format_ok(prompt: str, completion: str) -> bool:
    text = _apply_prefill(prompt, completion).strip()
    if len(_TAG_RE.findall(text)) != 4:  # each of the four tags exactly once, no variants
        return False
    m = _FORMAT_RE.fullmatch(text)
    return bool(m and m.group(1).strip() and m.group(2).strip())


@REWARDS.register("format")
def format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1.0 for exactly `<think>X</think>` + optional whitespace + `<answer>Y</answer>`, else 0.0."""
    return [1.0 if _format_ok(p, c) else 0.0 for p, c in zip(prompts, completions)]


@REWARDS.register("countdown")
def countdown_reward(prompts: list[str], completions: list[str], numbers: list | None = None,
                     target: list | None = None, **_) -> list[float]:
    """1.0 when the final answer is an equation using `numbers` that evaluates to `target`."""
    from lightning_rlhf.data.countdown import countdown_check

    if numbers is None or target is None:
        raise ValueError("the 'countdown' reward needs 'numbers' and 'target' columns (use the countdown data module)")
    out = []
    for p, c, nums, tgt in zip(prompts, completions, numbers, target):
        eq = extract_answer(c, p)
        out.append(1.0 if eq and countdown_check(eq, nums, tgt) else 0.0)
    return out


# ---------------------------------------------------------------- language consistency

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_LATIN = "A-Za-z\u00c0-\u024f"
_UNITS = re.compile(rf"(?P<zh>[{_HAN}])|(?P<en>[{_LATIN}]+)|(?P<other>[^\W\d_{_LATIN}{_HAN}]+)")
_NEUTRAL = re.compile(  # inline math, LaTeX commands, chat-template markers + role, think/answer tags
    r"\$[^$]*\$|\\\(.*?\\\)|\\[A-Za-z]+|<\|[^|]*\|>(?:system|user|assistant)?|</?(?:think|answer)>", re.DOTALL)
LANGUAGES = ("en", "zh")


def language_shares(text: str) -> dict[str, int]:
    """Counts of language units: Han characters (zh), Latin words of 2+ letters (en), other words."""
    counts = {"zh": 0, "en": 0, "other": 0}
    for m in _UNITS.finditer(_NEUTRAL.sub(" ", text)):
        if m.lastgroup != "en" or len(m.group()) > 1:
            counts[m.lastgroup] += 1
    return counts


def reasoning_text(prompt: str, completion: str) -> str | None:
    """The text inside the first `<think>...</think>` (a pre-filled `<think>` restored); None without one."""
    text = _apply_prefill(prompt, completion)
    start = text.find("<think>")
    end = text.find("</think>", start + 1) if start >= 0 else -1
    return None if start < 0 or end < 0 else text[start + len("<think>") : end]


def language_mixed(prompt: str, completion: str) -> bool:
    """True when the reasoning uses words of two or more languages (en, zh, other): the "language mixing"
    of R1-Zero. False without reasoning, or when it holds one language or only neutral text."""
    reasoning = reasoning_text(prompt, completion)
    return reasoning is not None and sum(v > 0 for v in language_shares(reasoning).values()) > 1


@REWARDS.register("language")
class LanguageConsistency:
    """Share of the reasoning written in `target` ("en", "zh", or "auto" = the prompt's language)."""

    def __init__(self, target: str = "auto"):
        if target not in (*LANGUAGES, "auto"):
            raise ValueError(f"language reward: unknown target '{target}'. Use one of: {', '.join(LANGUAGES)}, auto")
        self.target = target

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        return [self.score(p, c) for p, c in zip(prompts, completions)]

    def score(self, prompt: str, completion: str) -> float:
        target = self.target
        if target == "auto":
            counts = language_shares(prompt)
            target = "zh" if counts["zh"] > counts["en"] else "en"
        reasoning = reasoning_text(prompt, completion)
        if reasoning is None or not reasoning.strip():
            return 0.0  # no reasoning to be consistent in: skipping it must not pay
        counts = language_shares(reasoning)
        total = sum(counts.values())
        return 1.0 if total == 0 else counts[target] / total
