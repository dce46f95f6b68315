"""Advantage estimators: GAE (PPO), group baselines (GRPO, Dr. GRPO, RLOO) and REINFORCE++-baseline.

Public math, each on its natural shapes:
- `gae_advantages(rewards, values, mask, gamma, lam)`: per-token (advantages, returns), (B, T);
- `group_advantages(scores, group_size, scale_by_std, eps)`: (B,) (r - mean) / (std + eps) or r - mean;
  `grpo_advantages` / `dr_grpo_advantages` are its two settings;
- `rloo_advantages(scores, group_size)`: (B,) r_i - mean of the OTHER samples of the group;
- `reinforce_pp_baseline_advantages(scores, mask, group_size, all_reduce, eps)`: (B, T) r - group mean
  broadcast over tokens, then whitened over all real tokens of the batch (across ranks).

Trainers pick an estimator by name from `ADVANTAGE_ESTIMATORS` ("gae", "grpo", "dr_grpo", "rloo",
"reinforce++_baseline"). Every entry has ONE signature (see `ESTIMATOR_KEYWORDS`):

    fn(rewards (B, T), mask (B, T), *, group_size=1, values=None, gamma=1.0, lam=0.95, eps=1e-6,
       all_reduce=None) -> (advantages (B, T), returns (B, T))

`rewards` are per-token (an outcome score on the last real token; PPO adds -beta * kl per token). The
critic-free entries score each row by the masked sum of its rewards, so a row needs at least one real
token for its score to count. Keywords an entry does not use are ignored. The group entries return
returns = advantages. Advantages are targets, never differentiated: everything here runs under
`torch.no_grad()` and returns detached float32 (or float64) tensors, 0 at padding.

What the slides simplify:
- GAE: the slides write delta_t = V(s_{t+1}) - V(s_t), dropping the reward r_t and the discount gamma,
  and truncate the sum at K < T steps. We use the paper's delta_t = r_t + gamma V_{t+1} - V_t summed to
  the end of the response (Schulman et al. 2016, eq. 16).
- GRPO: the slides divide by std(G) without saying which std and without eps; we use the unbiased std
  plus eps (Shao et al. 2024, §4.1.2) and offer Dr. GRPO's unscaled variant (Liu et al. 2025).
- PPO whitens GAE advantages over the batch afterwards (`masked_whiten_all`); "gae" does not.
- REINFORCE++-baseline: OpenRLHF turns per-token rewards into gamma-discounted returns-to-go; we use
  the row's summed reward on every token (the same thing for an outcome reward with gamma = 1).
See docs/math.md for every formula and its citation.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lightning_rlhf.functional.masked import _as_float, _check_mask, masked_sum, masked_whiten_all
from lightning_rlhf.functional.registries import ADVANTAGE_ESTIMATORS

# The keywords every ADVANTAGE_ESTIMATORS entry accepts (after rewards and mask).
ESTIMATOR_KEYWORDS = ("group_size", "values", "gamma", "lam", "eps", "all_reduce")


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


def _grouped(rewards: Tensor, group_size: int, needs: str) -> Tensor:
    """Check `rewards` (B,) and `group_size`, return them float as (B / group_size, group_size)."""
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (one scalar per response), got shape {tuple(rewards.shape)}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for {needs}, got {group_size}; set num_generations >= 2")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards ({n}) is not divisible by group_size ({group_size}); each prompt "
            "must contribute exactly group_size consecutive samples"
        )
    return _as_float(rewards).reshape(-1, group_size)


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
    groups = _grouped(
        rewards, group_size, "group-normalised advantages (with one sample per prompt the group std "
        "is undefined and r - mean is always 0)"
    )
    centred = groups - groups.mean(dim=-1, keepdim=True)
    if scale_by_std:
        std = groups.std(dim=-1, unbiased=True, keepdim=True)
        # a group of identical rewards gets exactly 0 (no NaN from 0/0 when eps=0)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(rewards.shape[0])


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: (r - group mean) / (unbiased group std + eps); see `group_advantages`. Shapes: (B,) -> (B,)."""
    return group_advantages(rewards, group_size, scale_by_std=True, eps=eps)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): r - group mean, no division by the std. Shapes: (B,) -> (B,)."""
    return group_advantages(rewards, group_size, scale_by_std=False)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740).

    Shapes: rewards (B,), groups of `group_size` CONSECUTIVE samples -> (B,) advantages.

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  =  G/(G-1) * (r_i - mean(group))

    computed in the first (leave-one-out) form. Needs group_size >= 2.
    """
    groups = _grouped(rewards, group_size, "RLOO (the leave-one-out baseline averages the OTHER samples)")
    baseline = (groups.sum(dim=-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(rewards.shape[0])


def _per_token(per_row: Tensor, mask: Tensor) -> Tensor:
    """Broadcast (B,) over the real tokens of mask (B, T): torch.where(mask != 0, a[:, None], 0)."""
    if mask.dim() != 2 or mask.shape[0] != per_row.shape[0]:
        raise ValueError(
            f"mask must be (B, T) with B = {per_row.shape[0]} rows, got shape {tuple(mask.shape)}"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(keep, per_row[:, None], torch.zeros((), dtype=per_row.dtype, device=per_row.device))


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    rewards: Tensor,
    mask: Tensor,
    group_size: int,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++ with baseline (Hu et al. 2025, arXiv:2501.03262; OpenRLHF/verl
    "reinforce_plus_plus_baseline"): group-mean baseline, then batch whitening over all real tokens.

    Shapes: rewards (B,) (groups of `group_size` consecutive samples), mask (B, T) -> (B, T), 0 at padding.

        a_i   = r_i - mean(group)                       (no std)
        A_i,t = whiten(a_i broadcast over row i's real tokens)   (token-weighted, unbiased, all ranks)

    `all_reduce(t)` returns the element-wise sum of `t` over ranks (None: one process); see
    `masked_whiten_all`, which also raises if the batch has fewer than 2 real tokens in total.
    """
    centred = group_advantages(rewards, group_size, scale_by_std=False)
    return masked_whiten_all(_per_token(centred, mask), mask, all_reduce=all_reduce, eps=eps)


# ------------------------------------------------------------ registry entries (one shared signature)


def _row_scores(rewards: Tensor, mask: Tensor) -> Tensor:
    """(B,) score of each row: the masked sum of its per-token rewards (B, T)."""
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be per-token (B, T), got shape {tuple(rewards.shape)}; put each response's "
            "outcome score on its last real token (outcome_rewards(scores, mask) does that)"
        )
    return masked_sum(rewards, mask, dim=-1)


@ADVANTAGE_ESTIMATORS.register("gae")
def gae_estimator(
    rewards: Tensor, mask: Tensor, *, values: Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """The "gae" entry: `gae_advantages(rewards, values, mask, gamma, lam)`, not whitened; needs values."""
    if values is None:
        others = ", ".join(n for n in ADVANTAGE_ESTIMATORS if n != "gae")
        raise ValueError(
            "the 'gae' advantage estimator needs values=<(B, T) critic values>; pass the critic's "
            f"values, or pick a critic-free estimator ({others})"
        )
    return gae_advantages(rewards, values, mask, gamma, lam)


def _outcome_estimator(
    name: str, per_row: Callable[[Tensor, int, float], Tensor], doc: str
) -> Callable[..., tuple[Tensor, Tensor]]:
    """Register `per_row(scores (B,), group_size, eps) -> (B,)` as a per-token estimator `name`."""

    @torch.no_grad()
    def estimator(rewards: Tensor, mask: Tensor, *, group_size: int = 1, eps: float = 1e-6, **_: Any):
        adv = _per_token(per_row(_row_scores(rewards, mask), group_size, eps), mask)
        return adv, adv.clone()

    estimator.__name__ = estimator.__qualname__ = name + "_estimator"
    estimator.__doc__ = doc
    return ADVANTAGE_ESTIMATORS.register(name)(estimator)


grpo_estimator = _outcome_estimator(
    "grpo", lambda s, g, eps: group_advantages(s, g, scale_by_std=True, eps=eps),
    '"grpo": group_advantages(row sums, group_size, scale_by_std=True, eps) on every real token.',
)
dr_grpo_estimator = _outcome_estimator(
    "dr_grpo", lambda s, g, eps: group_advantages(s, g, scale_by_std=False),
    '"dr_grpo": row sum - group mean on every real token (Dr. GRPO, no std).',
)
rloo_estimator = _outcome_estimator(
    "rloo", lambda s, g, eps: rloo_advantages(s, g),
    '"rloo": rloo_advantages(row sums, group_size) on every real token.',
)


@ADVANTAGE_ESTIMATORS.register("reinforce++_baseline")
@torch.no_grad()
def reinforce_pp_baseline_estimator(
    rewards: Tensor, mask: Tensor, *, group_size: int = 1, eps: float = 1e-6,
    all_reduce: Callable[[Tensor], Tensor] | None = None, **_: Any,
) -> tuple[Tensor, Tensor]:
    """The "reinforce++_baseline" entry: `reinforce_pp_baseline_advantages` of the row sums.

    `eps` is the whitening's (added to the variance), so the registry default is 1e-6, not 1e-8.
    """
    adv = reinforce_pp_baseline_advantages(_row_scores(rewards, mask), mask, group_size, all_reduce, eps)
    return adv, adv.clone()
