"""Supervised fine-tuning (cold start, rejection-sampling SFT): imitate the completions of a dataset.

Each step: chat-format the prompt, append the completion and eos, and minimise token cross-entropy on
the completion tokens only (mean over all completion tokens of the batch). Validation reports the same
loss and the exact-answer accuracy of greedy generations on held-out prompts, once before training
(step 0) and at every validation. At the end the policy is written as an HF-format dir (`output_dir`),
which later stages take as `policy:`. With `lora` only LoRA adapters train (`models/lora.py`).
Simplified: single-turn prompts, no sequence packing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_rlhf.algorithms.stage import SupervisedStage, generate_text, language_mixed_share, source_record
from lightning_rlhf.models import apply_lora, load_causal_lm, load_tokenizer, require_checkpoint
from lightning_rlhf.models.chat import encode_completions
from lightning_rlhf.rewards import accuracy_reward
from lightning_rlhf.rollout import ROLLOUT_ENGINES


class SFT(SupervisedStage):
    """Token cross-entropy on completion tokens.

    Args:
        policy: HF model id or local dir of the causal LM to train.
        gguf_file: load `policy` from this GGUF file inside the dir (fp32).
        dtype: weights dtype (float32, bfloat16, float16).
        max_prompt_length: prompt tokens kept for the validation generations.
        val_max_new_tokens: generation budget for the validation accuracy.
        rollout_engine: engine used for the validation generations.
        **kwargs: output_dir, produced_by, optimizer, lr_schedule, warmup_steps, max_length, val_on_start, lora
            (`SupervisedStage`).
    """

    def __init__(self, policy: str, gguf_file: str | None = None, dtype: str = "float32", max_prompt_length: int = 256,
                 val_max_new_tokens: int = 64, rollout_engine: str = "hf", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_checkpoint(policy, self.produced_by)
        self.max_prompt_length, self.val_max_new_tokens = max_prompt_length, val_max_new_tokens
        self.tokenizer = load_tokenizer(policy)
        self.policy = apply_lora(load_causal_lm(policy, gguf_file=gguf_file, dtype=dtype), self.lora_cfg).train()
        self.model_sources["policy"] = source_record("causal_lm", policy, dtype, gguf_file)
        self.engine = ROLLOUT_ENGINES.get(rollout_engine)()

    def trained_model(self) -> torch.nn.Module:
        return self.policy

    # 1. the loss --------------------------------------------------------------------------------
    def _loss_sums(self, batch: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of token cross-entropies over completion tokens, and the number of those tokens."""
        enc = encode_completions(self.tokenizer, batch["prompt"], batch["completion"], self.max_length)
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
    def validate_batch(self, batch: dict[str, list]) -> None:
        with torch.no_grad():
            loss_sum, n_tokens = self._loss_sums(batch)
        self.val_metrics.update("val/loss", loss_sum.double() / n_tokens.clamp(min=1), n_tokens)
        if "answer" in batch:
            with self.full_parameters(self.policy):
                completions, _ = generate_text(self.policy, self.tokenizer, self.engine, batch["prompt"],
                                               max_new_tokens=self.val_max_new_tokens,
                                               max_prompt_length=self.max_prompt_length)
            self.val_metrics.update("val/accuracy", accuracy_reward(batch["prompt"], completions, answer=batch["answer"]))
            if mixed := language_mixed_share(batch, completions):
                self.val_metrics.update("val/language_mixed", mixed)
