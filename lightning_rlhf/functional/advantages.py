"""Advantage estimators: GAE for PPO, group-normalised rewards for GRPO and Dr. GRPO.

Trainers pick one by name from `ADVANTAGE_ESTIMATORS`:
- "gae"     -> `gae_advantages(rewards, values, mask, gamma, lam)`: per-token (advantages, returns);
- "grpo"    -> `grpo_advantages(rewards, group_size, eps)`: (B,) (r - mean) / (std + eps);
- "dr_grpo" -> `dr_grpo_advantages(rewards, group_size)`: (B,) r - mean.

Advantages are targets, never differentiated: every function here runs under `torch.no_grad()` and
returns detached float32 (or float64) tensors.

What the slides simplify:
- GAE: the slides write delta_t = V(s_{t+1}) - V(s_t), dropping the reward r_t and the discount gamma,
  and truncate the sum at K < T steps. We use the paper's delta_t = r_t + gamma V_{t+1} - V_t summed to
  the end of the response (Schulman et al. 2016, eq. 16).
- GRPO: the slides divide by std(G) without saying which std and without eps; we use the unbiased std
  plus eps (Shao et al. 2024, §4.1.2) and offer Dr. GRPO's unscaled variant (Liu et al. 2025).
- PPO whitens GAE advantages over the batch afterwards (`masked_whiten`); `gae_advantages` does not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.functional.masked import _check_mask
from lightning_rlhf.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@ADVANTAGE_ESTIMATORS.register("gae")
@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per response token.

    Shapes: rewards, values, mask (B, T) -> (advantages, returns), (B, T) each, 0 at padding.

        delta_t = r_t + gamma * V_{t+1} - V_t      (V_{t+1} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V

    r and V are treated as 0 at padded positions, so with right padding the recursion starts fresh at
    each sequence's last real token. Rewards are per token: in PPO (InstructGPT) r_t = -beta * kl_t with
    the score added on the last real token. Not whitened (see `masked_whiten`).
    A reversed loop over T, vectorised over B.
    """
    keep = _check_mask(rewards, mask)
    _check_mask(values, mask)
    zero = torch.zeros((), dtype=_as_float(rewards).dtype, device=rewards.device)
    r = torch.where(keep, _as_float(rewards), zero)
    v = torch.where(keep, _as_float(values).to(r.dtype), zero)
    T = r.shape[-1]
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[..., 0])
    next_adv = torch.zeros_like(r[..., 0])
    for t in reversed(range(T)):
        delta = r[..., t] + gamma * next_value - v[..., t]
        next_adv = delta + gamma * lam * next_adv
        advantages[..., t] = next_adv
        next_value = v[..., t]
    advantages = torch.where(keep, advantages, zero)
    returns = torch.where(keep, advantages + v, zero)
    return advantages, returns


@torch.no_grad()
def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-normalised advantages for GRPO (Shao et al. 2024, §4.1.2 / eq. 3's A_i).

    Shapes: rewards (B,) with B = num_prompts * group_size, the `group_size` samples of one prompt
    CONSECUTIVE -> (B,) advantages, one per response (broadcast over its tokens by the loss).

        A_i = (r_i - mean(group)) / (std(group) + eps)   std unbiased (Bessel-corrected)
        A_i =  r_i - mean(group)                          scale_by_std=False (Dr. GRPO, Liu et al. 2025)

    A group whose rewards are all equal (std 0) gets A = 0 for every member (no learning signal), even
    with eps = 0.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (one scalar per response), got shape {tuple(rewards.shape)}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 for group-normalised advantages, got {group_size}: with one "
            "sample per prompt the group std is undefined and r - mean is always 0; "
            "set num_generations >= 2"
        )
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards ({n}) is not divisible by group_size ({group_size}); each prompt "
            "must contribute exactly group_size consecutive samples"
        )
    groups = _as_float(rewards).reshape(-1, group_size)
    centred = groups - groups.mean(dim=-1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=-1, unbiased=True, keepdim=True)
        # a group of identical rewards gets exactly 0 (no NaN from 0/0 when eps=0)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(n)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: (r - group mean) / (unbiased group std + eps); see `group_advantages`."""
    return group_advantages(rewards, group_size, scale_by_std=True, eps=eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): r - group mean, no division by the std; see `group_advantages`."""
    return group_advantages(rewards, group_size, scale_by_std=False)
