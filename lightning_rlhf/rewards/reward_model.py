"""Score (prompt, completion) pairs with a trained reward model: `reward_model` in `REWARDS`.

`RewardModelScorer(path)` loads an `AutoModelForSequenceClassification` (one label) and its tokenizer
from a local HF-format directory (what `recipes/reward_model/tiny_arithmetic.yaml` writes) or a hub id,
on first call (a local path that does not exist fails at construction, a MissingFileError). Each pair is
rendered as a user/assistant chat when the tokenizer has a chat template (else prompt + completion), scored
in batches under `torch.no_grad()`, and the score is read at the
LAST REAL token found from the attention mask, with position ids from the mask too, so the score does
not depend on the padding side or on what else is in the batch.

Simplifications: decoder models with a `score` head (Llama, Qwen, Mistral...) are scored per token and
gathered by us; other heads (e.g. BERT's pooled classifier) use the model's own pooled logits. Texts
longer than `max_length` tokens keep their end (the completion), truncating from the left.

`release_weights: true` frees the model's weights after each call and reads them back from its safetensors
file before the next (`models/reloadable.py`, as the RL stages' `release_ref_pages` does for the reference):
the scores are the same, the weights are out of memory during the update.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch

from lightning_rlhf.errors import ConfigError, MissingFileError
from lightning_rlhf.rewards.registry import REWARDS

if TYPE_CHECKING:
    from lightning_rlhf.models.reloadable import ReloadableWeights

RECIPE_HINT = "train one with `python -m lightning_rlhf fit --config recipes/reward_model/tiny_arithmetic.yaml`"


@REWARDS.register("reward_model")
class RewardModelScorer:
    """Reward = the reward model's scalar score of (prompt, completion)."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None,
                 apply_chat_template: bool = True, release_weights: bool = False):
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"reward_model: batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) "
                              ">= 2")
        self.path = str(path)
        self._require_path()  # at construction: a typo fails the run before training, not at its first step
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device) if device else None
        self.apply_chat_template = apply_chat_template
        self.release_weights = release_weights
        self._weights: ReloadableWeights | None = None
        self.model = None
        self.tokenizer = None

    # ------------------------------------------------------------ loading

    def load(self) -> "RewardModelScorer":
        """Load model + tokenizer now (otherwise done on first call)."""
        if self.model is not None:
            return self
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = self._require_path()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())[:300]
            raise MissingFileError(f"could not load a reward model from '{self.path}' ({detail}); {RECIPE_HINT}") from e
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"reward model tokenizer at '{self.path}' has neither pad_token nor eos_token; "
                                  "set one in its tokenizer_config.json")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False)
        self.model, self.tokenizer = model.to(self.device or "cpu"), tokenizer
        if self.release_weights:
            from lightning_rlhf.models.reloadable import ReloadableWeights

            self._weights = ReloadableWeights(model, path, what=f"the reward model '{self.path}'",
                                              option="release_weights")
        return self

    def _require_path(self) -> str:
        """The expanded path; MissingFileError when it looks local (not a hub id) and does not exist."""
        from lightning_rlhf.models import looks_local  # here, not at the top: importing rewards stays light

        path = os.path.expanduser(self.path)
        if not os.path.exists(path) and looks_local(path):
            raise MissingFileError(f"reward model directory '{self.path}' does not exist; {RECIPE_HINT}, then point "
                                   "`path` at its saved HF directory")
        return path

    def to(self, device: str | torch.device) -> "RewardModelScorer":
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    # ------------------------------------------------------------ scoring

    def format_text(self, prompt: str, completion: str) -> str:
        """The text the reward model reads for one pair."""
        from lightning_rlhf.models import format_conversation  # the reward-model stage trains on this text

        if self.apply_chat_template:
            return format_conversation(self.tokenizer, prompt, completion)
        return prompt + completion

    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"reward_model: {len(prompts)} prompts but {len(completions)} completions")
        self.load()
        texts = [self.format_text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with self._weights.resident() if self._weights is not None else contextlib.nullcontext():
            for i in range(0, len(texts), self.batch_size):
                scores.extend(self._score_batch(texts[i : i + self.batch_size]))
        return scores

    @torch.no_grad()
    def _score_batch(self, texts: list[str]) -> list[float]:
        templated = self.apply_chat_template and getattr(self.tokenizer, "chat_template", None)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length, add_special_tokens=not templated)
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if int(mask.sum(-1).min()) == 0:
            raise ValueError("reward_model: a text tokenized to zero tokens; check the tokenizer and chat template")
        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(-1)  # index of last real token
        rows = torch.arange(ids.shape[0], device=device)
        head = getattr(self.model, "score", None)
        if isinstance(head, torch.nn.Module):
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
            values = head(hidden[rows, last]).squeeze(-1)
        else:
            values = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
        return values.float().cpu().tolist()
