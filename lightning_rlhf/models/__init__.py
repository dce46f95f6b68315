"""Building and loading the policy, reference, reward and critic models (HF id or local directory).

- `tokenizer.py`: a byte-level BPE tokenizer trained locally (`train_bpe_tokenizer`, `default_corpus`).
- `tiny.py`: `build_tiny_model`, a random tiny Llama + tokenizer saved as an HF directory (tests, quickstart).
- `loading.py`: loaders (`load_causal_lm`, `load_reward_model`, `load_critic`, `load_tokenizer`), forward
  helpers that are right for either padding side (`score_sequences`, `token_values`), `save_hf`,
  `require_checkpoint` and `gguf_to_hf`.
"""

from lightning_rlhf.models.loading import (
    gguf_to_hf,
    last_token_index,
    load_causal_lm,
    load_critic,
    load_reward_model,
    load_tokenizer,
    looks_local,
    position_ids_from_mask,
    require_checkpoint,
    save_hf,
    score_sequences,
    token_values,
)
from lightning_rlhf.models.tiny import build_tiny_model
from lightning_rlhf.models.tokenizer import CHATML_TEMPLATE, TAG_TOKENS, default_corpus, train_bpe_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "TAG_TOKENS",
    "build_tiny_model",
    "default_corpus",
    "gguf_to_hf",
    "last_token_index",
    "load_causal_lm",
    "load_critic",
    "load_reward_model",
    "load_tokenizer",
    "looks_local",
    "position_ids_from_mask",
    "require_checkpoint",
    "save_hf",
    "score_sequences",
    "token_values",
    "train_bpe_tokenizer",
]
