"""PPO as in InstructGPT (Ouyang et al. 2022), in miniature: a policy and a learned critic, KL in the reward.

Each training step, in order:
  1. rollout: sample `num_generations` responses per prompt (default 1; log-probs captured while sampling);
  2. score: the weighted `rewards` (a trained `reward_model` with `path:`, rule rewards, or both), then
     optionally whitened over the batch across ranks (`score_norm`) and clipped to +-`score_clip`;
  3. per-token rewards: r_t = -kl_coef * kl_t on every real token (kl of kind `kl_kind`, k1 as in
     InstructGPT eq. 2) plus the score on the last real token (`token_level_rewards`);
  4. old values: the critic's V(s_t) at the position that predicts response token t (`response_values`);
  5. GAE: `gae_advantages(rewards, old_values, mask, gamma, lam)` -> advantages and returns;
  6. whitening: advantages over the real tokens of the whole batch, across ranks (`whiten_across_ranks`);
  7. update: `ppo_epochs` passes in mini-batches of `mini_batch_size` responses (accumulating over
     `micro_batch_size`): the policy minimises the clipped surrogate - ent_coef * entropy, the critic the
     clipped value loss, each with its own optimizer, LR schedule and gradient clipping, in separate
     backward passes (the two models share no tensors, so neither loss reaches the other model);
     optionally stop early when an epoch's mean approx_kl exceeds `target_kl`;
  8. adaptive KL (`adaptive_kl`): kl_coef moves toward `kl_target` once per rollout (Ziegler et al. 2019).
`trainer.max_steps` counts rollout steps: only the policy's last step of a rollout advances global_step
(`algorithms/optim.py`); both LR schedules step once per rollout. Logs DESIGN.md §6's RL metrics plus
train/value_loss, value_clip_fraction, explained_variance, kl_coef, kl (per token), kl_seq (per response),
approx_kl, values, returns and ppo_epochs_run; val/accuracy and val/reward at step 0 and every validation.
Simplified: the sampling log-probs serve as the old policy (dropout is off); a response that hits
max_new_tokens is treated as finished (V = 0 after it, no bootstrap); `score_norm` whitens the scores of
each batch (no running statistics); the critic shares the policy's tokenizer.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_rlhf.algorithms import common
from lightning_rlhf.algorithms.common import (
    MetricSums, disable_dropout, export_hf, finish_validation, make_scheduler, validate_at_start,
)
from lightning_rlhf.algorithms.optim import as_list, step
from lightning_rlhf.algorithms.rl_common import (
    check_batch_sizes, load_policy_and_ref, reference_logprobs, rollout_and_score, rollout_metrics, validate_batch,
)
from lightning_rlhf.errors import ConfigError, MissingFileError
from lightning_rlhf.functional import (
    KL_ESTIMATORS, LOSS_AGGREGATIONS, adaptive_kl_coef, aggregate, explained_variance, gae_advantages,
    masked_mean, masked_sum, masked_whiten, policy_loss, token_level_rewards, value_loss,
)
from lightning_rlhf.rollout import sequence_logprobs

CRITIC_INITS = ("reward_model", "policy")


def response_values(critic: torch.nn.Module, ro: Any) -> Tensor:
    """(N, T) float32: V for response token t = the critic's output at position P-1+t of prompt+response
    (the position whose logits predict token t), with position ids from the mask; 0 at padding."""
    from lightning_rlhf.models import token_values

    p, t = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    values = token_values(critic, ro.input_ids, ro.attention_mask)  # (N, P+T)
    return torch.where(ro.response_mask > 0, values[:, p - 1 : p + t - 1], 0.0)


def whiten_across_ranks(x: Tensor, mask: Tensor, strategy: Any, eps: float = 1e-8) -> Tensor:
    """`masked_whiten` with the mean and (unbiased) variance over the real tokens of ALL ranks.

    Sums of x, x^2 and the token count are all-reduced (`strategy.reduce(..., reduce_op="sum")`) in
    float64; one process (or strategy None) is plain `masked_whiten`. Shapes: x, mask (B, T) -> (B, T).
    """
    if strategy is None or getattr(strategy, "world_size", 1) <= 1:
        return masked_whiten(x, mask, eps=eps)
    keep = mask > 0
    xd = torch.where(keep, x.double(), 0.0)
    stats = torch.stack([xd.sum(), (xd * xd).sum(), keep.double().sum()])
    s, ss, n = strategy.reduce(stats, reduce_op="sum").to(xd.device)
    if float(n) < 2:
        raise ValueError(f"whitening needs at least 2 real tokens across ranks, got {float(n):g}")
    mean = s / n
    var = (ss / n - mean * mean).clamp(min=0) * n / (n - 1)
    out = (xd - mean) * torch.rsqrt(var + eps)
    return torch.where(keep, out, 0.0).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class PPO(LightningModule):
    """PPO with a critic under manual optimization (two optimizers). See the module docstring."""

    def __init__(
        self,
        policy: str,
        rewards: dict[str, float] | list[dict[str, Any]] | None = None,
        critic: str | None = None,
        critic_init: str | None = None,
        ref_model: str | None = None,
        output_dir: str | None = None,
        critic_output_dir: str | None = None,
        produced_by: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        num_generations: int = 1,
        max_new_tokens: int = 128,
        max_prompt_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        kl_coef: float = 0.05,
        kl_kind: str = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        score_clip: float | None = None,
        score_norm: bool = False,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float | None = 0.2,
        ent_coef: float = 0.0,
        loss_agg: str = "token-mean",
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        target_kl: float | None = None,
        lr: float = 1e-6,
        critic_lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        critic_warmup_steps: int | None = None,
        critic_lr_schedule: str | None = None,
        max_grad_norm: float | None = 1.0,
        critic_max_grad_norm: float | None = 1.0,
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
        from lightning_rlhf.models import load_critic, looks_local
        from lightning_rlhf.rewards import CombinedReward
        from lightning_rlhf.rewards.reward_model import RECIPE_HINT
        from lightning_rlhf.rollout import ROLLOUT_ENGINES

        if adaptive_kl and not kl_coef > 0:
            raise ConfigError("adaptive_kl needs a starting kl_coef > 0 (it multiplies it); set e.g. kl_coef: 0.05")
        if ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs={ppo_epochs}: need at least one pass over each rollout")
        KL_ESTIMATORS.get(kl_kind), LOSS_AGGREGATIONS.get(loss_agg)  # a typo fails now, listing the valid names
        self.reward_fn = CombinedReward(rewards if rewards is not None else {"accuracy": 1.0})
        critic_path = self._critic_source(critic, critic_init, policy)
        self.policy, self.ref, self.tokenizer = load_policy_and_ref(policy, ref_model, kl_coef, produced_by,
                                                                    gguf_file, dtype)
        if critic is None and critic_path != policy and looks_local(critic_path) and not os.path.exists(critic_path):
            raise MissingFileError(f"reward model '{critic_path}' not found (the critic starts from it, critic_init="
                                   f"'reward_model'); {RECIPE_HINT}, or whichever recipe writes that directory")
        self.critic = disable_dropout(load_critic(critic_path, dtype=dtype)).train()
        vocab = [m.config.get_text_config().vocab_size for m in (self.policy, self.critic)]
        if vocab[0] != vocab[1]:
            raise ConfigError(f"critic '{critic_path}' has a vocabulary of {vocab[1]} tokens, the policy {vocab[0]}: "
                              "the critic reads the policy's tokens; start it from a model with the same tokenizer")
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
            self.critic.gradient_checkpointing_enable()
        self.engine = ROLLOUT_ENGINES.get(rollout_engine)(**(rollout_kwargs or {}))
        self.kl_coef = float(kl_coef)  # changes when adaptive_kl; saved in checkpoints
        self.val_sums = MetricSums()
        self.eval_history: list[tuple[int, dict[str, float]]] = []

    def _critic_source(self, critic: str | None, critic_init: str | None, policy: str) -> str:
        """The directory the critic is loaded from: `critic`, else the reward model's or the policy's."""
        rm_paths = [s.kwargs.get("path") for s in self.reward_fn.specs if s.name == "reward_model"]
        init = critic_init or ("reward_model" if rm_paths else "policy")
        if init not in CRITIC_INITS:
            raise ConfigError(f"critic_init={init!r} is not one of {list(CRITIC_INITS)}")
        if init == "reward_model" and not rm_paths:
            raise ConfigError("critic_init='reward_model' but `rewards` has no reward_model entry; add "
                              "{name: reward_model, weight: 1.0, path: <reward model dir>} or set critic_init: policy")
        return critic or (str(rm_paths[0]) if init == "reward_model" else policy)

    # ---- one rollout step ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        hp = self.hparams
        t0 = time.perf_counter()
        ro, rewards = rollout_and_score(self, batch, num_generations=hp.num_generations)         # 1-2
        kl_coef = self.kl_coef                                                                      # used in 3
        targets = self.compute_targets(ro, rewards.total.to(self.device))                           # 3-6
        t1 = time.perf_counter()
        stats = self.update(ro, targets["advantages"], targets["old_values"], targets["returns"])   # 7
        t2 = time.perf_counter()
        metrics = {**rollout_metrics(ro, rewards, t1 - t0, t2 - t1), **stats, "train/kl_coef": kl_coef}
        metrics.update(self.adapt_kl_coef(targets["kl"], ro.response_mask))                         # 8
        mask, values, returns = ro.response_mask, targets["old_values"], targets["returns"]
        metrics["train/explained_variance"] = float(explained_variance(values, returns, mask))
        metrics["train/values"] = float(masked_mean(values, mask))
        metrics["train/returns"] = float(masked_mean(returns, mask))
        self.log_dict(metrics, on_step=True, batch_size=len(batch["prompt"]))
        for sched in as_list(self.lr_schedulers()):
            sched.step()

    def adapt_kl_coef(self, kl: Tensor, mask: Tensor) -> dict[str, float]:
        """Step 8 (with `adaptive_kl`): move kl_coef once per rollout; returns the KL metrics.

        The controller reads the KL per response (sum over its tokens, mean over the responses of all ranks)
        and counts the responses of all ranks as n_steps, as in Ziegler et al.'s code. Without a reference
        model (kl_coef = 0) there is no KL to report."""
        if self.ref is None:
            return {}
        hp = self.hparams
        seq_kl = masked_sum(kl, mask, dim=-1).mean()
        if hp.adaptive_kl:
            mean_kl = float(self.trainer.strategy.reduce(seq_kl, reduce_op="mean"))
            n = kl.shape[0] * self.trainer.world_size
            self.kl_coef = adaptive_kl_coef(self.kl_coef, mean_kl, hp.kl_target, hp.kl_horizon, n)
        return {"train/kl": float(masked_mean(kl, mask)), "train/kl_seq": float(seq_kl)}

    @torch.no_grad()
    def compute_targets(self, ro: Any, scores: Tensor) -> dict[str, Tensor]:
        """Steps 2b-6: shaped scores -> per-token rewards, old values, GAE, whitened advantages."""
        hp, strategy = self.hparams, self.trainer.strategy if self._trainer is not None else None
        mask = ro.response_mask
        if hp.score_norm:  # whiten the scores of this batch (all ranks), then clip
            scores = whiten_across_ranks(scores[:, None], torch.ones_like(scores[:, None]), strategy)[:, 0]
        if hp.score_clip is not None:
            scores = scores.clamp(-hp.score_clip, hp.score_clip)
        ref_logp = reference_logprobs(self.ref, ro, hp.temperature, hp.micro_batch_size)
        rewards, kl = token_level_rewards(scores, ro.logprobs, ro.logprobs if ref_logp is None else ref_logp,
                                          mask, self.kl_coef, hp.kl_kind)
        chunk = hp.micro_batch_size or len(ro)
        idx = torch.arange(len(ro), device=ro.response_ids.device)
        self.critic.eval()
        old_values = torch.cat([response_values(self.critic, ro.select(i)) for i in idx.split(chunk)])
        self.critic.train()
        adv, returns = gae_advantages(rewards, old_values, mask, hp.gamma, hp.lam)
        adv = whiten_across_ranks(adv, mask, strategy)
        return {"rewards": rewards, "kl": kl, "old_values": old_values, "returns": returns, "advantages": adv}

    def policy_loss_terms(self, part: Any, adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy loss of a micro-batch: clipped surrogate - ent_coef * entropy (touches only the policy)."""
        hp = self.hparams
        logp, extra = sequence_logprobs(self.policy, part, hp.temperature, return_entropy=True,
                                        entropy_grad=hp.ent_coef != 0)
        mask = part.response_mask
        surrogate, st = policy_loss(logp, part.logprobs, adv, mask, clip_low=hp.cliprange, agg=hp.loss_agg,
                                    max_len=hp.max_new_tokens)
        entropy = aggregate(extra["entropy"], mask, hp.loss_agg, hp.max_new_tokens)
        stats = {"policy_loss": surrogate.detach(), "entropy": entropy.detach(),
                 "clip_fraction": st["clip_fraction"], "approx_kl": st["approx_kl"]}
        return surrogate - hp.ent_coef * entropy, stats

    def critic_loss_terms(self, part: Any, old_values: Tensor, returns: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value loss of a micro-batch (touches only the critic)."""
        hp = self.hparams
        values = response_values(self.critic, part)
        loss, st = value_loss(values, old_values, returns, part.response_mask, clip=hp.cliprange_value,
                              agg=hp.loss_agg, max_len=hp.max_new_tokens)
        return loss, {"value_loss": loss.detach(), "value_clip_fraction": st["clip_fraction"]}

    def update(self, ro: Any, adv: Tensor, old_values: Tensor, returns: Tensor) -> dict[str, float]:
        """ppo_epochs passes over `ro` in mini-batches; one step of each optimizer per mini-batch."""
        hp = self.hparams
        opt_pi, opt_v = self.optimizers()
        n = len(ro)
        mini, micro = check_batch_sizes(n, hp.mini_batch_size, hp.micro_batch_size)
        sums = MetricSums()
        for epoch in range(hp.ppo_epochs):
            batches = torch.randperm(n, device=ro.response_ids.device).split(mini)
            epoch_kl = MetricSums()
            for k, mb_idx in enumerate(batches):
                mb_tokens = ro.response_mask[mb_idx].sum().clamp(min=1)
                for idx in mb_idx.split(micro):
                    part = ro.select(idx)
                    tokens = part.response_mask.sum()
                    weight = tokens / mb_tokens if hp.loss_agg == "token-mean" else len(idx) / len(mb_idx)
                    loss_pi, st = self.policy_loss_terms(part, adv[idx])
                    self.manual_backward(loss_pi * weight)
                    loss_v, st_v = self.critic_loss_terms(part, old_values[idx], returns[idx])
                    self.manual_backward(loss_v * weight)
                    for key, value in {**st, **st_v}.items():
                        sums.add(f"train/{key}", value * tokens, tokens)
                    epoch_kl.add("approx_kl", st["approx_kl"] * tokens, tokens)
                last = k == len(batches) - 1 and (epoch == hp.ppo_epochs - 1 or self._kl_exceeded(epoch_kl))
                self._clip_and_step(opt_v, hp.critic_max_grad_norm, count=False)
                self._clip_and_step(opt_pi, hp.max_grad_norm, count=last)  # advances global_step once
            if last:
                break
        out = sums.compute()
        out["train/ppo_epochs_run"] = float(epoch + 1)
        return out

    def _kl_exceeded(self, epoch_kl: MetricSums) -> bool:
        """True when target_kl is set and this epoch's mean approx_kl (all ranks) exceeds it."""
        if self.hparams.target_kl is None:
            return False
        return epoch_kl.compute(self.trainer.strategy)["approx_kl"] > self.hparams.target_kl

    def _clip_and_step(self, opt: Any, max_norm: float | None, *, count: bool) -> None:
        if max_norm:
            self.clip_gradients(opt, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        step(self, opt, count=count)

    # ---- validation, plan, optimizers, export -------------------------------------------------------
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        validate_batch(self, batch, self.val_sums)

    def on_validation_epoch_end(self) -> None:
        finish_validation(self)

    def on_fit_start(self) -> None:
        self.reward_fn.to(self.device)  # a reward model scores on the training device

    def on_train_start(self) -> None:
        self.print_plan()
        validate_at_start(self, lambda batch: validate_batch(self, batch, self.val_sums), self.policy)

    def print_plan(self) -> None:
        """Responses, mini-batches and optimizer steps per rollout step; what is loaded."""
        if not self.trainer.is_global_zero:
            return
        hp, trainer = self.hparams, self.trainer
        prompts = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        n = prompts * hp.num_generations if isinstance(prompts, int) else None
        mini = hp.mini_batch_size or n
        per = hp.ppo_epochs * (n // mini) if n and mini else "?"
        print("\n".join([
            f"[PPO] plan per rollout step (per rank; {trainer.world_size} rank(s)):",
            f"  prompts/step          {prompts or '?'} x num_generations {hp.num_generations} = responses {n or '?'}",
            f"  mini-batches          {mini or '?'} responses, micro-batches {hp.micro_batch_size or mini or '?'}",
            f"  optimizer steps       {per} policy + {per} critic per rollout (ppo_epochs {hp.ppo_epochs}"
            f"{', target_kl ' + str(hp.target_kl) if hp.target_kl else ''}); max_steps {trainer.max_steps} = rollouts",
            f"  reward                {', '.join(self.reward_fn.names)}; kl_coef {self.kl_coef} ({hp.kl_kind}"
            f"{', adaptive to ' + str(hp.kl_target) + ' nats/response' if hp.adaptive_kl else ''}"
            f"{'' if self.ref is not None else ', no reference model'})",
            f"  critic                from {hp.critic or self._critic_source(None, hp.critic_init, hp.policy)}, "
            f"lr {hp.critic_lr}; policy lr {hp.lr}; gamma {hp.gamma}, lam {hp.lam}",
        ]), flush=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        total = common.total_training_steps(self.trainer)
        opt_pi = torch.optim.AdamW(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        opt_v = torch.optim.AdamW(self.critic.parameters(), lr=hp.critic_lr, weight_decay=hp.weight_decay)
        sched_pi = make_scheduler(opt_pi, hp.lr_schedule, hp.warmup_steps, total)
        warmup_v = hp.warmup_steps if hp.critic_warmup_steps is None else hp.critic_warmup_steps
        sched_v = make_scheduler(opt_v, hp.critic_lr_schedule or hp.lr_schedule, warmup_v, total)
        return [opt_pi, opt_v], [sched_pi, sched_v]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ppo_kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.kl_coef = float(checkpoint.get("ppo_kl_coef", self.kl_coef))

    def on_train_end(self) -> None:
        self.export_dir = export_hf(self.policy, self.tokenizer, self.hparams.output_dir, self.trainer)
        self.critic_export_dir = export_hf(self.critic, self.tokenizer, self.hparams.critic_output_dir, self.trainer)
