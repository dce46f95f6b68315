"""PPO as in InstructGPT (Ouyang et al. 2022), in miniature: a policy and a learned critic, KL in the reward.

Each training step, in order:
  1. rollout: sample `rollout.num_generations` responses per prompt (default 1); old log-probs from
     sampling, or recomputed when precisions differ (`optim.old_logprobs`);
  2. score: the weighted `rewards` (a trained `reward_model` with `path:`, rule rewards, or both), then
     optionally whitened over the batch across ranks (`score_norm`) and clipped to +-`score_clip`;
  3. per-token rewards: r_t = -beta * kl_t on every real token (kl of kind `loss.kl_kind`, k1 as in
     InstructGPT eq. 2) plus the score on the last real token (`token_level_rewards`);
  4. old values: the critic's V(s_t) at the position that predicts response token t (`response_values`);
  5. advantages: `advantage.estimator` (gae: GAE(gamma, lam) -> advantages and returns), whitened over the
     real tokens of the whole batch, across ranks (`advantage.whiten`);
  6. update: `optim.epochs` passes in mini-batches: the policy minimises `loss.name` (ppo_clip: clipped
     surrogate - ent_coef * entropy), the critic the clipped value loss, each with its own optimizer,
     LR schedule and gradient clipping, in separate backward passes (the two models share no tensors);
     optionally stop early when an epoch's mean approx_kl exceeds `target_kl`;
  7. adaptive KL (`adaptive_kl`): beta moves toward `kl_target` once per rollout (Ziegler et al. 2019).
`trainer.max_steps` counts rollout steps: only the policy's last step of a rollout advances global_step.
Logs the RL metrics plus train/value_loss, value_clip_fraction, explained_variance, kl_coef, kl (per
token), kl_seq (per response), values, returns and epochs_run. Simplified: a response that hits
max_new_tokens is treated as finished (V = 0 after it, no bootstrap); `score_norm` whitens the scores of
each batch (no running statistics); the critic shares the policy's tokenizer.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_rlhf.algorithms.metrics import Means
from lightning_rlhf.algorithms.options import (
    AdvantageOptions, CriticOptions, LossOptions, OptimOptions, RolloutOptions, as_options,
)
from lightning_rlhf.algorithms.rl_stage import RLStage, disable_dropout, rollout_metrics
from lightning_rlhf.algorithms.stage import source_record
from lightning_rlhf.errors import ConfigError, MissingFileError
from lightning_rlhf.functional import (
    adaptive_kl_coef, masked_sum, masked_whiten_all, token_level_rewards, value_loss,
)
from lightning_rlhf.models import apply_lora, load_critic, looks_local, token_values
from lightning_rlhf.rollout import Rollout, use_fused_training_ops

CRITIC_INITS = ("reward_model", "policy")
RM_HINT = "train one with `python -m lightning_rlhf fit --config recipes/reward_model/tiny_arithmetic.yaml`"


def value_metrics(values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, float]:
    """train/values, train/returns (means over real tokens) and train/explained_variance (1 - Var[returns -
    values] / Var[returns], population variances as `explained_variance`), over the tokens of every rank:
    Var[x] = E[x^2] - E[x]^2 from synchronised means (float64)."""
    ret, res = returns.double(), (returns - values).double()
    means = Means()
    for name, x in (("train/values", values.double()), ("train/returns", ret), ("res", res)):
        means.update(name, x, mask)
        means.update(name + "_sq", x * x, mask)
    m = means.compute()
    ret_sq = m.pop("train/returns_sq")
    var_ret = ret_sq - m["train/returns"] ** 2
    var_res = m.pop("res_sq") - m.pop("res") ** 2
    m.pop("train/values_sq")
    # equal returns leave E[x^2] - E[x]^2 at rounding level: nothing to explain (NaN), as explained_variance
    m["train/explained_variance"] = 1.0 - var_res / var_ret if var_ret > 1e-12 * max(1.0, ret_sq) else float("nan")
    return m


def response_values(critic: torch.nn.Module, ro: Rollout) -> Tensor:
    """(N, T) float32: V for response token t = the critic's output at position P-1+t of prompt+response
    (the position whose logits predict token t), with position ids from the mask; 0 at padding."""
    p, t = ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    values = token_values(critic, ro.input_ids, ro.attention_mask)  # (N, P+T)
    return torch.where(ro.response_mask > 0, values[:, p - 1 : p + t - 1], 0.0)


class PPO(RLStage):
    """PPO with a critic under manual optimization (two optimizers). See the module docstring."""

    def __init__(
        self,
        critic: CriticOptions = CriticOptions(),
        critic_optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-5, weight_decay=0.0),
        rollout: RolloutOptions = RolloutOptions(num_generations=1),
        advantage: AdvantageOptions = AdvantageOptions(estimator="gae", whiten=True),
        loss: LossOptions = LossOptions(name="ppo_clip", beta=0.05, kl_kind="k1"),
        optim: OptimOptions = OptimOptions(epochs=4),
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        target_kl: float | None = None,
        score_clip: float | None = None,
        score_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        """Args:
            critic: where the critic starts, its value clip, gradient clipping, schedule and output dir.
            critic_optimizer: the critic's optimizer (any torch.optim class).
            rollout: sampling options (PPO default: one response per prompt).
            advantage: estimator (gae) and whitening.
            loss: policy loss (ppo_clip); `beta` and `kl_kind` make the per-token KL penalty in the reward.
            optim: epochs, mini/micro-batches, gradient clipping and schedule of the policy.
            adaptive_kl: move beta toward `kl_target` once per rollout (Ziegler et al. 2019).
            kl_target: target KL per response (nats) of the adaptive controller.
            kl_horizon: responses over which the controller moves beta by about e^0.2.
            target_kl: stop a rollout's epochs early when an epoch's mean approx_kl exceeds it.
            score_clip: clip the scores to +-score_clip (after score_norm).
            score_norm: whiten the scores of each batch (all ranks).
            **kwargs: the shared RL options of `RLStage` (policy, rewards, optimizer, ...).
        """
        super().__init__(rollout=rollout, advantage=advantage, loss=loss, optim=optim, **kwargs)
        if adaptive_kl and not self.loss_cfg.beta > 0:
            raise ConfigError("adaptive_kl needs a starting loss.beta > 0 (it multiplies it); set e.g. beta: 0.05")
        self.critic_cfg, self.critic_optimizer_fn = as_options(CriticOptions, critic), critic_optimizer
        self.adaptive_kl, self.kl_target, self.kl_horizon, self.target_kl = adaptive_kl, kl_target, kl_horizon, target_kl
        self.score_clip, self.score_norm = score_clip, score_norm
        self.critic_source = self._critic_source()
        critic = apply_lora(load_critic(self.critic_source, dtype=self.model_dtype), self.lora_cfg, "token_cls")
        self.critic = use_fused_training_ops(disable_dropout(critic).train())  # with `lora`: + a value head
        self.model_sources["critic"] = source_record("critic", self.critic_source, self.model_dtype,
                                                     tokenizer=self.policy_source)
        vocab = [m.config.get_text_config().vocab_size for m in (self.policy, self.critic)]
        if vocab[0] != vocab[1]:
            raise ConfigError(f"critic '{self.critic_source}' has a vocabulary of {vocab[1]} tokens, the policy "
                              f"{vocab[0]}: the critic reads the policy's tokens; start it from a model with the same "
                              "tokenizer")
        if self.gradient_checkpointing:
            self.critic.gradient_checkpointing_enable()
        self.kl_coef = float(self.loss_cfg.beta)  # changes when adaptive_kl; saved in checkpoints

    def _critic_source(self) -> str:
        """The directory the critic is loaded from: `critic.path`, else the reward model's or the policy's."""
        cfg, policy = self.critic_cfg, self.policy_source
        rm_paths = [s.kwargs.get("path") for s in self.reward_fn.specs if s.name == "reward_model"]
        init = cfg.init or ("reward_model" if rm_paths else "policy")
        if init not in CRITIC_INITS:
            raise ConfigError(f"critic.init={init!r} is not one of {list(CRITIC_INITS)}")
        if init == "reward_model" and not rm_paths:
            raise ConfigError("critic.init='reward_model' but `rewards` has no reward_model entry; add "
                              "{name: reward_model, weight: 1.0, path: <reward model dir>} or set critic.init: policy")
        path = cfg.path or (str(rm_paths[0]) if init == "reward_model" else policy)
        if cfg.path is None and path != policy and looks_local(path) and not os.path.exists(path):
            raise MissingFileError(f"reward model '{path}' not found (the critic starts from it, critic.init="
                                   f"'reward_model'); {RM_HINT}, or whichever recipe writes that directory")
        return path

    # ---- one rollout step ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        t0 = time.perf_counter()
        ro, rewards = self.rollout_and_score(batch)                                                  # 1-2
        ro, old_stats = self.old_logprobs(ro)
        kl_coef = self.kl_coef                                                                        # used in 3
        targets = self.compute_targets(ro, rewards.total.to(self.device))                             # 3-5
        self.last_rollout = {"prompts": batch["prompt"], "rollout": ro, "rewards": rewards,
                             "advantages": targets["advantages"]}
        t1 = time.perf_counter()
        stats = self.update(ro, targets["advantages"], targets["old_values"], targets["returns"])     # 6
        metrics = {**rollout_metrics(ro, rewards, t1 - t0, time.perf_counter() - t1, self.world_size()),
                   **old_stats, **stats}
        metrics["train/kl_coef"] = kl_coef
        metrics.update(self.adapt_kl_coef(targets["kl"], ro.response_mask))                          # 7
        metrics.update(value_metrics(targets["old_values"], targets["returns"], ro.response_mask))
        self.log_step(metrics, batch)

    def adapt_kl_coef(self, kl: Tensor, mask: Tensor) -> dict[str, float]:
        """Step 7 (with `adaptive_kl`): move beta once per rollout; returns the KL metrics.

        The controller reads the KL per response (sum over its tokens, mean over the responses of all ranks)
        and counts the responses of all ranks as n_steps, as in Ziegler et al.'s code. Without a reference
        model (beta = 0) there is no KL to report."""
        if self.ref is None and not self.ref_is_base:
            return {}
        means = Means()
        means.update("train/kl", kl, mask)
        means.update("train/kl_seq", masked_sum(kl, mask, dim=-1))
        m = means.compute()
        if self.adaptive_kl:
            n = kl.shape[0] * self.world_size()
            self.kl_coef = adaptive_kl_coef(self.kl_coef, m["train/kl_seq"], self.kl_target, self.kl_horizon, n)
        return m

    @torch.no_grad()
    def compute_targets(self, ro: Rollout, scores: Tensor) -> dict[str, Tensor]:
        """Steps 2b-5: shaped scores -> per-token rewards, old values, (whitened) advantages and returns."""
        mask = ro.response_mask
        if self.score_norm:  # whiten the scores of this batch (all ranks), then clip
            scores = masked_whiten_all(scores[:, None], torch.ones_like(scores[:, None]), self.all_reduce_sum())[:, 0]
        if self.score_clip is not None:
            scores = scores.clamp(-self.score_clip, self.score_clip)
        ref_logp = self.reference_logprobs(ro)
        rewards, kl = token_level_rewards(scores, ro.logprobs, ro.logprobs if ref_logp is None else ref_logp,
                                          mask, self.kl_coef, self.loss_cfg.kl_kind)
        self.critic.eval()
        old_values = torch.cat([response_values(self.critic, part) for part in self.no_grad_parts(ro)])
        self.critic.train()
        adv, returns = self.advantages(rewards, mask, ro.group_size, values=old_values)
        return {"rewards": rewards, "kl": kl, "old_values": old_values, "returns": returns, "advantages": adv}

    def critic_loss(self, part: Rollout, old_values: Tensor, returns: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped value loss of a micro-batch (touches only the critic)."""
        values = response_values(self.critic, part)
        loss, st = value_loss(values, old_values, returns, part.response_mask, clip=self.critic_cfg.value_clip,
                              agg=self.loss_cfg.agg,
                              max_len=self.loss_cfg.max_len or self.rollout_cfg.max_new_tokens)
        return loss, {"value_loss": loss.detach(), "value_clip_fraction": st["clip_fraction"]}

    def update(self, ro: Rollout, adv: Tensor, old_values: Tensor, returns: Tensor) -> dict[str, float]:
        """`optim.epochs` passes over `ro` in mini-batches; one step of each optimizer per mini-batch."""
        opt_pi, opt_v = self.optimizers()
        stats, epoch_kl, mb_loss = Means(), Means(), {"policy loss": 0.0, "value loss": 0.0}
        for mb in self.micro_batches(ro):
            loss_pi, st = self.policy_loss(mb.part, adv[mb.idx], None)  # the KL is in the reward (step 3)
            self.manual_backward(loss_pi * mb.weight)
            loss_v, st_v = self.critic_loss(mb.part, old_values[mb.idx], returns[mb.idx])
            self.manual_backward(loss_v * mb.weight)
            mb_loss = {"policy loss": mb_loss["policy loss"] + loss_pi.detach() * mb.weight,
                       "value loss": mb_loss["value loss"] + loss_v.detach() * mb.weight}
            stats.update_all({**st, **st_v}, mb.tokens, prefix="train/")
            epoch_kl.update("approx_kl", st["approx_kl"], mb.tokens)
            if not mb.ends_minibatch:
                continue
            stop = mb.ends_epoch and not mb.last and self._kl_exceeded(epoch_kl)
            self.step_models([(opt_v, self.critic_cfg.max_grad_norm, False),  # global_step once, by the policy:
                              (opt_pi, self.optim_cfg.max_grad_norm, mb.last or stop)],
                             mb_loss, {"policy": self.policy, "critic": self.critic})
            mb_loss = {"policy loss": 0.0, "value loss": 0.0}
            if stop:
                break
        return {**stats.compute(), "train/epochs_run": float(mb.epoch + 1)}

    def _kl_exceeded(self, epoch_kl: Means) -> bool:
        """True when target_kl is set and this epoch's mean approx_kl (all ranks) exceeds it; resets the mean."""
        kl = epoch_kl.compute()["approx_kl"]
        return self.target_kl is not None and kl > self.target_kl

    # ---- plan, optimizers, checkpoints, export -------------------------------------------------------
    def extra_plan_lines(self) -> list[str]:
        c = self.critic_cfg
        return [f"  critic                from {self.critic_source}; stepped with the policy; value clip "
                f"{c.value_clip}; {self.advantage_cfg.estimator} (gamma {self.advantage_cfg.gamma}, lam "
                f"{self.advantage_cfg.lam}){'; adaptive KL to ' + str(self.kl_target) if self.adaptive_kl else ''}"]

    def configure_optimizers(self) -> Any:
        o, c = self.optim_cfg, self.critic_cfg
        opt_pi, sched_pi = self.make_optimizer(self.optimizer_fn, self.policy, self.lr_schedule())
        critic_schedule = (c.lr_schedule or o.lr_schedule, o.warmup_steps if c.warmup_steps is None else c.warmup_steps)
        opt_v, sched_v = self.make_optimizer(self.critic_optimizer_fn, self.critic, critic_schedule)
        return [opt_pi, opt_v], [sched_pi, sched_v]

    def resume_state(self) -> dict[str, Any]:
        return {**super().resume_state(), "kl_coef": self.kl_coef}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        super().load_resume_state(state)
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))

    def exports(self) -> list[tuple[torch.nn.Module, str | None]]:
        return [(self.policy, self.output_dir), (self.critic, self.critic_cfg.output_dir)]
