"""Pure tensor math for RL post-training: masked ops, log-probs, KL, advantages, losses.

No nn.Module state, no Lightning, no config objects: tensors in, tensors (and detached stats) out.
Shapes: B sequences, T response tokens, `mask` (B, T) = 1 on real response tokens, 0 on right padding.
Variants are chosen by name from the registries `KL_ESTIMATORS`, `ADVANTAGE_ESTIMATORS` and
`LOSS_AGGREGATIONS`. See DESIGN.md §2 for the equations.
"""

from lightning_rlhf.functional.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    gae_advantages,
    group_advantages,
    grpo_advantages,
)
from lightning_rlhf.functional.kl import KL_ESTIMATORS, kl_penalty
from lightning_rlhf.functional.logprobs import entropy_from_logits, logprobs_from_logits
from lightning_rlhf.functional.losses import (
    LOSS_AGGREGATIONS,
    aggregate,
    bradley_terry_loss,
    grpo_loss,
    policy_loss,
    value_loss,
)
from lightning_rlhf.functional.masked import masked_mean, masked_sum, masked_var, masked_whiten
from lightning_rlhf.functional.ppo import adaptive_kl_coef, explained_variance, token_level_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "adaptive_kl_coef",
    "aggregate",
    "bradley_terry_loss",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "explained_variance",
    "gae_advantages",
    "group_advantages",
    "grpo_advantages",
    "grpo_loss",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_level_rewards",
    "value_loss",
]
