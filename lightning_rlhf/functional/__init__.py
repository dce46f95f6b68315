"""Pure tensor math for RL post-training: masked ops, log-probs, KL, advantages, losses.

No nn.Module state, no Lightning, no config objects: tensors in, tensors (and detached stats) out.
Shapes: B sequences, T response tokens, `mask` (B, T) = 1 on real response tokens, 0 on right padding.
Variants are chosen by name from the registries `KL_ESTIMATORS`, `LOSS_AGGREGATIONS`,
`ADVANTAGE_ESTIMATORS` and `POLICY_LOSSES` (defined in the leaf module `registries`, filled by the
modules that implement the entries; all entries of one registry share one signature).
What each function simplifies is in its module's docstring; docs/math.md has the equations and
their citations.
"""

from lightning_rlhf.functional.advantages import (
    dr_grpo_advantages, gae_advantages, group_advantages, grpo_advantages, reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from lightning_rlhf.functional.kl import kl_penalty
from lightning_rlhf.functional.logprobs import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from lightning_rlhf.functional.losses import aggregate, bradley_terry_loss, grpo_loss, policy_loss, value_loss
from lightning_rlhf.functional.masked import masked_mean, masked_sum, masked_var, masked_whiten, masked_whiten_all
from lightning_rlhf.functional.policy_losses import PolicyLossOptions  # noqa: F401  (fills POLICY_LOSSES)
from lightning_rlhf.functional.ppo import (
    adaptive_kl_coef, explained_variance, outcome_rewards, token_level_rewards,
)
from lightning_rlhf.functional.registries import (
    ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES,
)

__all__ = [
    # registries (name -> function; one signature per registry)
    "ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
    # masked reductions
    "masked_mean", "masked_sum", "masked_var", "masked_whiten", "masked_whiten_all",
    # log-probs, KL
    "entropy_from_logits", "logprobs_and_entropy", "logprobs_from_logits", "kl_penalty",
    # advantages
    "dr_grpo_advantages", "gae_advantages", "group_advantages", "grpo_advantages",
    "reinforce_pp_baseline_advantages", "rloo_advantages",
    # losses
    "aggregate", "bradley_terry_loss", "grpo_loss", "policy_loss", "value_loss",
    # per-token rewards, PPO specifics
    "adaptive_kl_coef", "explained_variance", "outcome_rewards", "token_level_rewards",
]
