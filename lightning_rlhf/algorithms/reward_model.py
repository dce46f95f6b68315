"""Reward model: learn a scalar score from preference pairs with the Bradley-Terry loss.

Each step scores `prompt + chosen` and `prompt + rejected` (chat-formatted, in one forward pass) and
minimises `-log sigmoid(R(chosen) - R(rejected) - margin)` (InstructGPT eq. 1; `margin` is Llama 2's
optional per-pair margin column). The model is `AutoModelForSequenceClassification` with one label,
loaded from any causal-LM dir (InstructGPT starts it from the SFT model) or an encoder. Logs
`train/loss`, `val/loss`, `val/accuracy` (share of pairs ranked right) and `val/margin`, and writes an
HF-format dir that the RL stages load as the `reward_model` reward. With `lora` the body trains LoRA adapters
and the score head trains in full (`models/lora.py`); export them `merged` for the `reward_model` reward.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_rlhf.algorithms.stage import SupervisedStage, source_record
from lightning_rlhf.functional import bradley_terry_loss
from lightning_rlhf.models import apply_lora, load_reward_model, load_tokenizer, require_checkpoint, score_sequences
from lightning_rlhf.models.chat import format_conversation


class RewardModel(SupervisedStage):
    """Bradley-Terry reward model.

    Args:
        model: HF id or local dir to start from (a causal LM gets a fresh scalar head).
        use_margin: read a `margin` column from the data and subtract it inside the sigmoid.
        **kwargs: output_dir, produced_by, optimizer, lr_schedule, warmup_steps, max_length, val_on_start, lora
            (`SupervisedStage`).
    """

    def __init__(self, model: str, use_margin: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_checkpoint(model, self.produced_by)
        self.use_margin = use_margin
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.model = apply_lora(load_reward_model(model), self.lora_cfg, "seq_cls").train()
        self.model_sources["model"] = source_record("reward_model", model, padding_side="right")

    def trained_model(self) -> torch.nn.Module:
        return self.model

    def _scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        texts = [format_conversation(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             add_special_tokens=False, return_tensors="pt").to(self.device)
        return score_sequences(self.model, enc["input_ids"], enc["attention_mask"])

    def _pair_loss(self, batch: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(batch["prompt"])
        scores = self._scores(batch["prompt"] * 2, list(batch["chosen"]) + list(batch["rejected"]))
        margin = None
        if self.use_margin:
            margin = torch.tensor([float(m) for m in batch["margin"]], device=scores.device)
        return bradley_terry_loss(scores[:n], scores[n:], margin=margin)

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        loss, stats = self._pair_loss(batch)
        n = len(batch["prompt"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/accuracy", stats["accuracy"], batch_size=n)
        return loss

    def validate_batch(self, batch: dict[str, list]) -> None:
        with torch.no_grad():
            loss, stats = self._pair_loss(batch)
        self.val_metrics.update_all({"val/loss": loss, **{f"val/{k}": stats[k] for k in ("accuracy", "margin")}},
                                    len(batch["prompt"]))
