"""Reward model: learn a scalar score from preference pairs with the Bradley-Terry loss.

Each step scores `prompt + chosen` and `prompt + rejected` (chat-formatted, in one forward pass) and
minimises `-log sigmoid(R(chosen) - R(rejected) - margin)` (InstructGPT eq. 1; `margin` is Llama 2's
optional per-pair margin column). The model is `AutoModelForSequenceClassification` with one label,
loaded from any causal-LM dir (InstructGPT starts it from the SFT model) or an encoder. Logs
`train/loss`, `val/loss`, `val/accuracy` (share of pairs ranked right) and `val/margin`, and writes an
HF-format dir that the RL stages load as the `reward_model` reward.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_rlhf.algorithms.common import (
    MetricSums, adamw_with_schedule, export_hf, finish_validation, format_conversation, validate_at_start,
)
from lightning_rlhf.functional import bradley_terry_loss


class RewardModel(LightningModule):
    """Bradley-Terry reward model.

    Args:
        model: HF id or local dir to start from (a causal LM gets a fresh scalar head).
        output_dir: where the trained reward model is saved (HF format) at the end.
        produced_by: recipe that writes `model`, named in the error when that dir is missing.
        use_margin: read a `margin` column from the data and subtract it inside the sigmoid.
    """

    def __init__(
        self,
        model: str,
        output_dir: str | None = None,
        produced_by: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        max_length: int = 512,
        use_margin: bool = False,
        val_on_start: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from lightning_rlhf.models import load_reward_model, load_tokenizer, require_checkpoint

        require_checkpoint(model, produced_by)
        self.tokenizer = load_tokenizer(model, padding_side="right")
        self.model = load_reward_model(model).train()
        self.val_sums = MetricSums()
        self.eval_history: list[tuple[int, dict[str, float]]] = []

    def _scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        from lightning_rlhf.models import score_sequences

        texts = [format_conversation(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.hparams.max_length,
                             add_special_tokens=False, return_tensors="pt").to(self.device)
        return score_sequences(self.model, enc["input_ids"], enc["attention_mask"])

    def _pair_loss(self, batch: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(batch["prompt"])
        scores = self._scores(batch["prompt"] * 2, list(batch["chosen"]) + list(batch["rejected"]))
        margin = None
        if self.hparams.use_margin:
            margin = torch.tensor([float(m) for m in batch["margin"]], device=scores.device)
        return bradley_terry_loss(scores[:n], scores[n:], margin=margin)

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        loss, stats = self._pair_loss(batch)
        n = len(batch["prompt"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/accuracy", stats["accuracy"], batch_size=n)
        return loss

    def _validate_batch(self, batch: dict[str, list]) -> None:
        n = len(batch["prompt"])
        with torch.no_grad():
            loss, stats = self._pair_loss(batch)
        self.val_sums.add("val/loss", loss * n, n)
        self.val_sums.add("val/accuracy", stats["accuracy"] * n, n)
        self.val_sums.add("val/margin", stats["margin"] * n, n)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._validate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        finish_validation(self)

    def on_train_start(self) -> None:
        validate_at_start(self, self._validate_batch, self.model)

    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(self.model.parameters(), self.hparams, self.trainer)

    def on_train_end(self) -> None:
        self.export_dir = export_hf(self.model, self.tokenizer, self.hparams.output_dir, self.trainer)
