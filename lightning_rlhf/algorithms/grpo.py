"""GRPO (DeepSeekMath, Shao et al. 2024): critic-free RL with group-normalised advantages.

Each training step, in order:
  1. rollout: sample G = `rollout.num_generations` responses per prompt (log-probs kept from sampling, or
     recomputed teacher-forced when sampling and training precisions differ: `optim.old_logprobs`);
  2. reward: score them with the weighted `rewards`; each score sits on its response's last token;
  3. advantage: `advantage.estimator` over each group of G (grpo: (r - mean) / (std + eps); dr_grpo, rloo
     and reinforce++_baseline by name), broadcast over the response's tokens;
  4. update: `optim.epochs` (mu) passes over the rollout in mini-batches of `optim.mini_batch_size`
     responses (gradient accumulation over `optim.micro_batch_size`), minimising `loss.name` (grpo:
     clipped surrogate + beta * KL(k3) to a frozen reference, which is not loaded when beta = 0).
`trainer.max_steps` counts rollout steps (see `algorithms/optim.py`); the LR schedule steps once per
rollout step. Everything but these steps is `RLStage`'s. Simplified: in one precision the sampling
log-probs serve as the "old" policy (the rollout-parity test shows they equal a teacher-forced pass; dropout
is disabled).
"""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor

from lightning_rlhf.algorithms.metrics import Means
from lightning_rlhf.algorithms.options import AdvantageOptions, LossOptions, RolloutOptions, as_options
from lightning_rlhf.algorithms.rl_stage import RLStage, rollout_metrics
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.functional import outcome_rewards
from lightning_rlhf.rollout import Rollout


class GRPO(RLStage):
    """Group Relative Policy Optimization under manual optimization. See the module docstring."""

    def __init__(
        self,
        advantage: AdvantageOptions = AdvantageOptions(estimator="grpo"),
        loss: LossOptions = LossOptions(name="grpo", beta=0.04, kl_kind="k3"),
        **kwargs: Any,
    ) -> None:
        """Args:
            advantage: advantage estimator over each group (grpo, dr_grpo, rloo, reinforce++_baseline).
            loss: policy loss (grpo: clipped surrogate + beta * KL in the loss).
            **kwargs: the shared RL options of `RLStage` (policy, rewards, rollout, optim, optimizer, ...).
        """
        rollout = as_options(RolloutOptions, kwargs.get("rollout"))
        if rollout.num_generations < 2:  # checked before any model is loaded
            raise ConfigError(f"rollout.num_generations={rollout.num_generations}: GRPO scores each response against "
                              "the other responses to its prompt, so with one per prompt every advantage is zero and "
                              "nothing is learnt; set num_generations >= 2 (e.g. 8), or use PPO, whose critic is the "
                              "baseline")
        super().__init__(advantage=advantage, loss=loss, **kwargs)

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        t0 = time.perf_counter()
        ro, rewards = self.rollout_and_score(batch)                                              # 1-2
        ro, old_stats = self.old_logprobs(ro)
        scores = rewards.total.to(self.device)
        adv, _ = self.advantages(outcome_rewards(scores, ro.response_mask), ro.response_mask,     # 3
                                 ro.group_size)
        ref_logp = self.reference_logprobs(ro)
        self.last_rollout = {"prompts": batch["prompt"], "rollout": ro, "rewards": rewards, "advantages": adv}
        t1 = time.perf_counter()
        stats = self.update(ro, adv, ref_logp)                                                    # 4
        metrics = {**rollout_metrics(ro, rewards, t1 - t0, time.perf_counter() - t1, self.world_size()),
                   **old_stats, **stats}
        self.log_step(metrics, batch)

    def update(self, ro: Rollout, adv: Tensor, ref_logp: Tensor | None) -> dict[str, float]:
        """`optim.epochs` passes of policy-loss updates over `ro`; token-weighted mean statistics."""
        opt, stats, mb_loss = self.optimizers(), Means(), 0.0
        for mb in self.micro_batches(ro):
            ref = None if ref_logp is None else ref_logp[mb.idx]
            loss, st = self.policy_loss(mb.part, adv[mb.idx], ref)
            self.manual_backward(loss * mb.weight)
            mb_loss = mb_loss + loss.detach() * mb.weight
            stats.update_all({"loss": loss, **st}, mb.tokens, prefix="train/")
            if mb.ends_minibatch:
                self.step_models([(opt, self.optim_cfg.max_grad_norm, mb.last)], {"policy loss": mb_loss},
                                 {"policy": self.policy})
                mb_loss = 0.0
        return stats.compute()

