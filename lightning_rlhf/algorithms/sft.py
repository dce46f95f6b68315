"""Supervised fine-tuning (cold start, rejection-sampling SFT): imitate the completions of a dataset.

Each step: chat-format the prompt, append the completion and eos, and minimise token cross-entropy on
the completion tokens only (mean over all completion tokens of the batch). Validation reports the same
loss and the exact-answer accuracy of greedy generations on held-out prompts, once before training
(step 0) and at every validation. At the end the policy is written as an HF-format dir (`output_dir`),
which later stages take as `policy:`. Simplified: single-turn prompts, no sequence packing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from lightning_rlhf.algorithms.common import (
    MetricSums, adamw_with_schedule, encode_completions, export_hf, finish_validation, generate_text,
    validate_at_start,
)


class SFT(LightningModule):
    """Token cross-entropy on completion tokens.

    Args:
        policy: HF model id or local dir of the causal LM to train.
        output_dir: where the trained policy is saved (HF format) at the end; None skips saving.
        produced_by: recipe that writes `policy`, named in the error when that dir is missing.
        gguf_file: load `policy` from this GGUF file inside the dir (fp32).
        lr, weight_decay, warmup_steps, lr_schedule: AdamW and its schedule (constant, linear, cosine).
        max_length: prompt + completion tokens kept (cut at the end).
        val_max_new_tokens: generation budget for the validation accuracy.
        val_on_start: run validation before the first update (step 0).
    """

    def __init__(
        self,
        policy: str,
        output_dir: str | None = None,
        produced_by: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        max_length: int = 512,
        max_prompt_length: int = 256,
        val_max_new_tokens: int = 64,
        val_on_start: bool = True,
        rollout_engine: str = "hf",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from lightning_rlhf.models import load_causal_lm, load_tokenizer, require_checkpoint
        from lightning_rlhf.rollout import ROLLOUT_ENGINES

        require_checkpoint(policy, produced_by)
        self.tokenizer = load_tokenizer(policy)
        self.policy = load_causal_lm(policy, gguf_file=gguf_file, dtype=dtype).train()
        self.engine = ROLLOUT_ENGINES.get(rollout_engine)()
        self.val_sums = MetricSums()
        self.eval_history: list[tuple[int, dict[str, float]]] = []

    # 1. the loss --------------------------------------------------------------------------------
    def _loss_sums(self, batch: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of token cross-entropies over completion tokens, and the number of those tokens."""
        enc = encode_completions(self.tokenizer, batch["prompt"], batch["completion"], self.hparams.max_length)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        logits = self.policy(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        labels = enc["labels"][:, 1:]
        loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        return loss_sum, (labels != -100).sum()

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens = self._loss_sums(batch)
        loss = loss_sum / n_tokens.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        self.log("train/tokens", n_tokens.float(), reduce_fx="sum", batch_size=len(batch["prompt"]))
        return loss

    # 2. validation: loss and greedy exact-answer accuracy ------------------------------------------
    def _validate_batch(self, batch: dict[str, list]) -> None:
        with torch.no_grad():
            loss_sum, n_tokens = self._loss_sums(batch)
        self.val_sums.add("val/loss", loss_sum, n_tokens)
        if "answer" in batch:
            from lightning_rlhf.rewards import accuracy_reward

            completions, _ = generate_text(self.policy, self.tokenizer, self.engine, batch["prompt"],
                                        max_new_tokens=self.hparams.val_max_new_tokens,
                                        max_prompt_length=self.hparams.max_prompt_length)
            correct = accuracy_reward(batch["prompt"], completions, answer=batch["answer"])
            self.val_sums.add("val/accuracy", sum(correct), len(correct))

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._validate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        finish_validation(self)

    def on_train_start(self) -> None:
        validate_at_start(self, self._validate_batch, self.policy)

    # 3. optimisation and export --------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(self.policy.parameters(), self.hparams, self.trainer)

    def on_train_end(self) -> None:
        self.export_dir = export_hf(self.policy, self.tokenizer, self.hparams.output_dir, self.trainer)
