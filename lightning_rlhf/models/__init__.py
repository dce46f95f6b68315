"""Building and loading the policy, reference, reward and critic models (HF id or local directory).

Importing the package gives every public name of its modules, so callers write
`from lightning_rlhf.models import load_causal_lm`. Simplification: the modules below import only
`lightning_rlhf.errors` from the rest of the package; they know nothing of stages or rewards.

- `tokenizer.py`: a byte-level BPE tokenizer trained locally (`train_bpe_tokenizer`, `default_corpus`).
- `tiny.py`: `build_tiny_model`, a random tiny Llama + tokenizer saved as an HF directory (tests, quickstart).
- `loading.py`: loaders (`load_causal_lm`, `load_reward_model`, `load_critic`, `load_tokenizer`), forward
  helpers that are right for either padding side (`score_sequences`, `token_values`), `save_hf`,
  `require_checkpoint`, `gguf_to_hf`, and `check_writable` / `write_dir_atomically` (output dirs).
- `lora.py`: LoRA through PEFT (`LoraOptions`, `apply_lora`, the adapters-off reference, merged/adapter export).
- `attention.py`: "sdpa_gqa", grouped-query attention without key/value copies on a CPU (the loaders switch to it).
- `cpu_linear.py`: float32 linears through oneDNN where a probe finds it faster (the loaders switch to them),
  and `PackedLinear`, weights in oneDNN's layout for the rollout engine.
- `reloadable.py`: `ReloadableWeights`, a frozen model's weights freed between uses and read back from its
  safetensors checkpoint.
- `chat.py`: chat formatting and tokenizing (`chat_prompts`, `encode_prompts`, `encode_completions`,
  `format_conversation`), shared by the stages and the reward-model scorer.
"""

from lightning_rlhf.models.chat import chat_prompts, encode_completions, encode_prompts, format_conversation
from lightning_rlhf.models.loading import (
    check_writable,
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
    write_dir_atomically,
)
from lightning_rlhf.models.lora import LoraOptions, apply_lora, trainable_parameters, unwrap_peft
from lightning_rlhf.models.tiny import build_tiny_model
from lightning_rlhf.models.tokenizer import CHATML_TEMPLATE, TAG_TOKENS, default_corpus, train_bpe_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "LoraOptions",
    "TAG_TOKENS",
    "apply_lora",
    "build_tiny_model",
    "chat_prompts",
    "check_writable",
    "default_corpus",
    "encode_completions",
    "encode_prompts",
    "format_conversation",
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
    "trainable_parameters",
    "unwrap_peft",
    "write_dir_atomically",
]
