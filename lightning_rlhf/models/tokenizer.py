"""Tiny byte-level BPE tokenizers trained locally, plus the corpus they are trained on.

`train_bpe_tokenizer` builds a `transformers.PreTrainedTokenizerFast` with the `tokenizers` library, so
tests and the CPU quickstart need no model hub:

- byte-level BPE (GPT-2 style): every UTF-8 string, Chinese included, encodes and decodes back exactly;
  digits are split one per token before BPE (as Llama and Qwen do), which helps arithmetic tasks;
- special tokens `<|pad|>` (pad, id 0), `<|im_start|>`, `<|im_end|>` (eos: generation stops on it),
  `<|endoftext|>` (bos, never added automatically), and no unk token (bytes cover everything);
- `<think>`, `</think>`, `<answer>`, `</answer>` as ordinary added tokens: one token per tag, and
  `decode(skip_special_tokens=True)` keeps them;
- a ChatML chat template and left padding (for batched generation).

Simplification: the vocabulary is tiny (hundreds of tokens) and learnt from `default_corpus`, a
synthetic mix of arithmetic, tags, English and Chinese. It is for tests and toy runs, not for quality.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_rlhf.errors import ConfigError

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, ENDOFTEXT]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message; "<|im_start|>assistant\n" to generate.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_BYTE_ALPHABET = len(pre_tokenizers.ByteLevel.alphabet())  # 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, *, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; `len(tokenizer) <= vocab_size` (== on a rich corpus).

    The vocabulary holds the 256 byte symbols, the 4 special tokens, the 4 tag tokens and learnt merges.
    Special tokens and tags inside `texts` are removed before training, so no merges are spent on them.
    """
    n_fixed = _BYTE_ALPHABET + len(SPECIAL_TOKENS) + len(TAG_TOKENS)
    if vocab_size <= n_fixed:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs {n_fixed} fixed entries "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special + {len(TAG_TOKENS)} tag tokens); use vocab_size > {n_fixed}."
        )
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),  # the tags are added after training
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((_strip_reserved(t) for t in texts), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        padding_side="left",  # must be a constructor argument: set later, it is not saved
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
    )


def _strip_reserved(text: str) -> str:
    for t in SPECIAL_TOKENS + TAG_TOKENS:
        text = text.replace(t, " ")
    return text


# ----------------------------------------------------------------------------------------- corpus
_EN_WORDS = (
    "the a an is are was be to of and in on for with what how many much answer question think step "
    "first then so result sum total add plus minus times number numbers calculate compute equal equals "
    "final check please solve problem let us we have get take left right yes no good correct wrong "
    "apple apples book books cat dog student students teacher buys gives each more less than"
).split()
_EN_SENTENCES = [
    "What is the result?",
    "Let us think step by step.",
    "Please put the final answer in the answer tags.",
    "The answer is correct.",
    "First add the numbers, then subtract.",
    "You are a helpful assistant.",
    "Tom has 12 apples and gives 5 to Anna. How many apples are left?",
]
_ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动"
    "同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自"
    "二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日"
    "那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变"
    "条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
    "几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器"
    "压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安"
    "场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集"
    "温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连"
    "断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精"
    "值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属"
    "圆包火住调满县局照参红细引听该铁价严"
)
_ZH_SENTENCES = [
    "请计算下面的算式。",
    "答案是十六。",
    "我们一步一步地思考。",
    "这道题的答案是正确的。",
    "先做加法，再做减法。",
    "请把最终答案写在答案标签里。",
    "小明有十二个苹果，给了小红五个，还剩几个？",
]
_PUNCT = list(".,;:!?()[]{}-+*/=%'\"") + ["，", "。", "？", "！", "：", "（", "）"]


def _arith(rng: random.Random) -> tuple[str, str]:
    """An expression like '12+7-3' and the R1-style working '12+7=19, 19-3=16' (value in the last part)."""
    value = rng.randint(0, 99)
    expr, steps = str(value), []
    for _ in range(rng.randint(1, 3)):
        op, n = rng.choice("+-*"), rng.randint(0, 99)
        new = value + n if op == "+" else value - n if op == "-" else value * n
        steps.append(f"{value}{op}{n}={new}")
        expr, value = f"{expr}{op}{n}", new
    return expr, ", ".join(steps) + f"|{value}"


def default_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` short synthetic lines (arithmetic with R1 tags, English, Chinese, digits, punctuation).

    Deterministic for a given `seed`. Good enough to train the tiny tokenizer; not natural text.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            expr, work = _arith(rng)
            lines.append(f"{expr}={work.split('|')[1]}")
        elif kind == 1:
            expr, work = _arith(rng)
            steps, value = work.split("|")
            lines.append(f"What is {expr}? <think>{steps}</think><answer>{value}</answer>")
        elif kind == 2:
            words = rng.choices(_EN_WORDS, k=rng.randint(4, 12))
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
        elif kind == 3:
            lines.append(rng.choice(_EN_SENTENCES) + " " + str(rng.randint(0, 9999)))
        elif kind == 4:
            chars = "".join(rng.choices(_ZH_CHARS, k=rng.randint(4, 16)))
            lines.append(rng.choice(_ZH_SENTENCES) + chars + rng.choice(["。", "？", "！"]))
        else:
            parts = [rng.choice(_PUNCT) for _ in range(4)] + [str(rng.randint(0, 999)) for _ in range(3)]
            rng.shuffle(parts)
            lines.append(" ".join(parts) + " " + "".join(rng.choices(_ZH_CHARS, k=3)))
    return lines
