"""Build a tiny, randomly initialised Llama and its tokenizer as a Hugging Face directory.

`build_tiny_model` is how tests, the CPU quickstart and benchmarks get a "pretrained" policy without a
model hub: it trains a byte-level BPE tokenizer locally, builds `LlamaForCausalLM` from a `LlamaConfig`
with weights drawn from a seeded generator, and writes both with `save_hf`, so every later stage loads it
exactly like a real checkpoint (`load_causal_lm(dir)`, `load_reward_model(dir)`, ...).

Simplifications: the weights are random, not pretrained (what such a model can learn is whatever the SFT
stage teaches it); the architecture is always Llama, with only the sizes configurable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_rlhf.models.loading import save_hf
from lightning_rlhf.models.tokenizer import default_corpus, train_bpe_tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """Train a tokenizer (on `texts`, default `default_corpus(seed=seed)`), build a random Llama, save both.

    `intermediate_size` defaults to 4 * hidden_size rounded up to a multiple of 32. The model's
    vocabulary is `len(tokenizer)` (equal to `vocab_size` unless the corpus is too small to learn that
    many merges). Same arguments and seed give byte-identical weights; the global RNG is left untouched.
    Returns `Path(out_dir)`.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}.")
    if intermediate_size is None:
        intermediate_size = 32 * math.ceil(4 * hidden_size / 32)
    tokenizer = train_bpe_tokenizer(
        default_corpus(seed=seed) if texts is None else texts,
        vocab_size=vocab_size,
        model_max_length=max_position_embeddings,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return save_hf(model, tokenizer, out_dir)
