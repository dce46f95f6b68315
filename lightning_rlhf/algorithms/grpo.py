"""GRPO (DeepSeekMath, Shao et al. 2024): critic-free RL with group-normalised advantages.

Each training step, in order:
  1. rollout: sample G = `num_generations` responses per prompt (log-probs captured while sampling);
  2. reward: score them with the weighted reward functions of `rewards`;
  3. advantage: `group_advantages` (scale_by_std=False gives Dr. GRPO), broadcast over tokens;
  4. update: `num_iterations` (mu) passes over the rollout in mini-batches of `mini_batch_size` responses
     (gradient accumulation over `micro_batch_size`), minimising `grpo_loss` = clipped surrogate +
     beta * KL(k3) to a frozen reference (not loaded when beta = 0).
`trainer.max_steps` counts rollout steps (see `algorithms/optim.py`); the LR schedule steps once per
rollout step. Simplified: the sampling log-probs serve as the "old" policy (the rollout-parity test
shows they equal a teacher-forced pass), and dropout is disabled in the policy so they stay equal.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_rlhf.algorithms.common import (
    MetricSums, adamw_with_schedule, export_hf, finish_validation, validate_at_start,
)
from lightning_rlhf.algorithms.optim import as_list, step
from lightning_rlhf.algorithms.rl_common import (
    check_batch_sizes, load_policy_and_ref, reference_logprobs, print_plan, rollout_and_score, rollout_metrics, validate_batch,
)
from lightning_rlhf.functional import group_advantages, grpo_loss
from lightning_rlhf.rollout import sequence_logprobs


class GRPO(LightningModule):
    """Group Relative Policy Optimization under manual optimization. See the module docstring."""

    def __init__(
        self,
        policy: str,
        rewards: dict[str, float] | list[dict[str, Any]] | None = None,
        ref_model: str | None = None,
        output_dir: str | None = None,
        produced_by: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        num_generations: int = 8,
        max_new_tokens: int = 128,
        max_prompt_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.04,
        kl_kind: str = "k3",
        clip_low: float = 0.2,
        clip_high: float | None = None,
        loss_agg: str = "token-mean",
        max_len: int | None = None,
        scale_by_std: bool = True,
        adv_eps: float = 1e-6,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        max_grad_norm: float | None = 1.0,
        rollout_engine: str = "hf",
        rollout_kwargs: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        val_accuracy_reward: str = "accuracy",
        val_max_new_tokens: int | None = None,
        val_on_start: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        from lightning_rlhf.rewards import CombinedReward
        from lightning_rlhf.rollout import ROLLOUT_ENGINES

        self.reward_fn = CombinedReward(rewards if rewards is not None else {"accuracy": 1.0})
        self.policy, self.ref, self.tokenizer = load_policy_and_ref(policy, ref_model, beta, produced_by, gguf_file, dtype)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.engine = ROLLOUT_ENGINES.get(rollout_engine)(**(rollout_kwargs or {}))
        self.val_sums = MetricSums()
        self.eval_history: list[tuple[int, dict[str, float]]] = []

    # ---- one rollout step ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        ro, rewards = rollout_and_score(self, batch, num_generations=hp.num_generations)      # 1-2
        adv = group_advantages(rewards.total.to(self.device), hp.num_generations,                # 3
                               scale_by_std=hp.scale_by_std, eps=hp.adv_eps)
        ref_logp = reference_logprobs(self.ref, ro, hp.temperature, hp.micro_batch_size)
        t1 = time.perf_counter()
        stats = self.update(ro, adv, ref_logp)                                                   # 4
        t2 = time.perf_counter()
        metrics = rollout_metrics(ro, rewards, t1 - t0, t2 - t1)
        groups = rewards.total.view(-1, hp.num_generations)
        metrics["train/frac_zero_std_groups"] = float((groups.std(dim=1, unbiased=True) < 1e-8).float().mean())
        metrics.update(stats)
        self.log_dict(metrics, on_step=True, batch_size=len(batch["prompt"]))
        for sched in as_list(self.lr_schedulers()):
            sched.step()

    def update(self, ro: Any, adv: torch.Tensor, ref_logp: torch.Tensor | None) -> dict[str, float]:
        """mu passes of clipped-surrogate + KL updates over `ro`; returns token-weighted mean stats."""
        hp = self.hparams
        opt = self.optimizers()
        n = len(ro)
        mini, micro = check_batch_sizes(n, hp.mini_batch_size, hp.micro_batch_size)
        n_updates, done = hp.num_iterations * (n // mini), 0
        sums = MetricSums()
        for _ in range(hp.num_iterations):
            for mb_idx in torch.randperm(n, device=ro.response_ids.device).split(mini):
                mb_tokens = ro.response_mask[mb_idx].sum().clamp(min=1)
                for idx in mb_idx.split(micro):
                    part = ro.select(idx)
                    logp, extra = sequence_logprobs(self.policy, part, hp.temperature, return_entropy=True)
                    loss, st = grpo_loss(
                        logp, part.logprobs, None if ref_logp is None else ref_logp[idx], adv[idx],
                        part.response_mask, beta=hp.beta, clip_low=hp.clip_low, clip_high=hp.clip_high,
                        agg=hp.loss_agg, kl_kind=hp.kl_kind, max_len=hp.max_len or hp.max_new_tokens,
                    )
                    tokens = part.response_mask.sum()
                    weight = tokens / mb_tokens if hp.loss_agg == "token-mean" else len(idx) / len(mb_idx)
                    self.manual_backward(loss * weight)
                    sums.add("train/loss", loss.detach() * tokens, tokens)
                    sums.add("train/entropy", (extra["entropy"] * part.response_mask).sum(), tokens)
                    for key in ("policy_loss", "clip_fraction", "kl", "approx_kl"):
                        if key in st:
                            sums.add(f"train/{key}", st[key] * tokens, tokens)
                if hp.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                done += 1
                step(self, opt, count=done == n_updates)
        return sums.compute()

    # ---- validation: greedy accuracy and reward on held-out prompts ----------------------------------
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        validate_batch(self, batch, self.val_sums)

    def on_validation_epoch_end(self) -> None:
        finish_validation(self)

    def on_fit_start(self) -> None:
        self.reward_fn.to(self.device)  # a reward model scores on the training device

    def on_train_start(self) -> None:
        print_plan(self)
        validate_at_start(self, lambda batch: validate_batch(self, batch, self.val_sums), self.policy)

    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(self.policy.parameters(), self.hparams, self.trainer)

    def on_train_end(self) -> None:
        self.export_dir = export_hf(self.policy, self.tokenizer, self.hparams.output_dir, self.trainer)

