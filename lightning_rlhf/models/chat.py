"""Chat formatting and tokenizing of prompts and completions, shared by the stages and the reward scorer.

`chat_prompts` renders each prompt as one user turn plus the assistant generation prompt;
`encode_prompts` left-pads and left-truncates those for generation; `encode_completions` builds
prompt + completion + eos rows with labels for SFT; `format_conversation` is the text a reward model
reads (training and scoring use this one function, so they see the same text).

Simplifications: prompts are single-turn user messages; a completion is the assistant turn followed by
the eos token; a tokenizer without a chat template gets the plain texts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Format each prompt as a single user turn plus the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    return list(prompts)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad prompts -> (input_ids, attention_mask), truncated from the left."""
    texts = chat_prompts(tokenizer, prompts)
    side, tside = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                        add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, tside
    return enc["input_ids"], enc["attention_mask"]


def encode_completions(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Prompt + completion + eos, right-padded. `labels` are -100 on prompt and padding tokens.

    Returns input_ids, attention_mask, labels (B, L) and `response_mask` (B, L) = 1 on completion tokens.
    Sequences longer than max_length are cut at the end (the eos may be lost; that is counted as
    truncation by the caller if it cares).
    """
    eos = tokenizer.eos_token or ""
    rows = []
    for ptxt, comp in zip(chat_prompts(tokenizer, prompts), completions):
        p_ids = tokenizer(ptxt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(comp + eos, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, c_ids))
    L = min(max_length, max(len(p) + len(c) for p, c in rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = (p + c)[:L]
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        if len(seq) > len(p):
            labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "response_mask": (labels != -100).long()}


def format_conversation(tokenizer: Any, prompt: str, completion: str) -> str:
    """The text a reward model scores: the user prompt and the assistant completion, chat-formatted."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
    return prompt + completion
