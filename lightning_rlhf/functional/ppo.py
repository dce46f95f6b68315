"""PPO-specific math: InstructGPT's per-token rewards, explained variance, the adaptive KL coefficient.

- `token_level_rewards(scores, logp, ref_logp, mask, kl_coef, kl_kind)`: r_t = -kl_coef * kl_t on every
  real response token, plus the sequence's score on its last real token (Ouyang et al. 2022, eq. 2, where
  the penalty is beta * log(pi / pi_ref), i.e. the k1 estimator; Ziegler et al. 2019, arXiv:1909.08593).
- `outcome_rewards(scores, mask)`: the score alone on the last real token (what the critic-free advantage
  estimators take as per-token rewards).
- `explained_variance(values, returns, mask)`: 1 - Var[R - V] / Var[R] over real tokens, the usual check
  that a critic predicts something (1: perfect, 0: no better than a constant, < 0: worse).
- `adaptive_kl_coef(kl_coef, current_kl, target, horizon, n_steps)`: the log-space proportional controller
  of Ziegler et al. 2019 (arXiv:1909.08593, Methods: e_t and beta_{t+1}).

All run under `torch.no_grad()` where they take tensors: their outputs are targets and statistics.
What the slides simplify: they put the KL penalty into the loss ("- beta KL"); InstructGPT's PPO puts
it into the per-token reward, so the critic and GAE see it too (docs/math.md, "Per-token rewards").
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.functional.kl import kl_penalty
from lightning_rlhf.functional.masked import _as_float, _check_mask, masked_mean

# The controller's proportional error is clipped to this range (Ziegler et al. 2019).
ADAPTIVE_KL_CLIP = 0.2


@torch.no_grad()
def token_level_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, kl_kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: r_t = -kl_coef * kl_t, plus `scores[b]` on row b's last real token.

    Shapes: scores (B,); logp, ref_logp, mask (B, T) -> (rewards (B, T), kl (B, T)), float32 (or wider),
    both 0 at padding. kl_t = kl_penalty(logp, ref_logp, kl_kind): "k1" = logp - ref_logp is
    InstructGPT's beta * log(pi_RL / pi_SFT) per token (Ouyang et al. 2022, eq. 2); "k3" is DeepSeekMath's
    low-variance estimator (always >= 0). With right padding the last real token of row b is at
    index sum(mask[b]) - 1; a row without real tokens gets no score (and has no token to carry it).
    """
    keep = _check_mask(logp, mask)
    if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
        raise ValueError(
            f"scores must have shape (B,) = ({logp.shape[0]},), one score per response; got {tuple(scores.shape)}"
        )
    kl = kl_penalty(logp, ref_logp, kl_kind)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    kl = torch.where(keep, kl, zero)
    rewards = -float(kl_coef) * kl
    _add_on_last_token(rewards, scores, keep)
    return rewards, kl


def _add_on_last_token(rewards: Tensor, scores: Tensor, keep: Tensor) -> None:
    """In place: rewards[b, last real token of row b] += scores[b]; rows without a real token get nothing."""
    positions = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).amax(dim=-1)  # (B,), -1 if empty
    has_token = last >= 0
    rows = torch.arange(keep.shape[0], device=keep.device)[has_token]
    rewards[rows, last[has_token]] += _as_float(scores)[has_token].to(rewards.dtype)


@torch.no_grad()
def outcome_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards of an outcome score: `scores[b]` on row b's last real token, 0 elsewhere.

    Shapes: scores (B,), mask (B, T) -> (B, T) float32 (float64 stays float64). The input the critic-free
    `ADVANTAGE_ESTIMATORS` entries expect (they sum each row back to its score, exactly). A row without
    a real token has nowhere to put its score and gets none (a rollout that keeps the eos always has one).
    """
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(
            f"expected scores (B,) and mask (B, T) with the same B, got {tuple(scores.shape)} and "
            f"{tuple(mask.shape)}"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    rewards = torch.zeros(mask.shape, dtype=_as_float(scores).dtype, device=scores.device)
    _add_on_last_token(rewards, scores, keep)
    return rewards


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over the real tokens (a 0-dim tensor).

    Shapes: values, returns, mask (B, T) -> scalar. Population variances (the n / (n - 1) factors
    cancel). NaN when the returns have zero variance (nothing to explain), as in Stable-Baselines3.
    """
    keep = _check_mask(values, mask)
    if returns.shape != values.shape:
        raise ValueError(f"returns shape {tuple(returns.shape)} does not match values {tuple(values.shape)}")
    ret = _as_float(returns)
    diff = ret - _as_float(values).to(ret.dtype)

    def var(x: Tensor) -> Tensor:
        return masked_mean((x - masked_mean(x, keep)) ** 2, keep)

    var_ret = var(ret)
    if float(var_ret) == 0.0:
        return torch.full((), float("nan"), dtype=ret.dtype, device=ret.device)
    return 1.0 - var(diff) / var_ret


def adaptive_kl_coef(kl_coef: float, current_kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019; `AdaptiveKLController` in their lm-human-preferences code):

        e_t         = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1}  = beta_t * (1 + e_t * n_steps / horizon)

    `current_kl` is the measured KL of the last rollout (their code: per-response sum over tokens, mean
    over responses), `n_steps` the number of responses in that rollout, `horizon` how many responses the
    controller takes to move beta by a factor of about e^{+-0.2}; the paper's K_beta is n_steps / horizon.
    Floats in, float out (0-dim tensors are accepted).
    """
    if not target > 0:
        raise ValueError(f"kl_target must be > 0 (nats), got {target}")
    if not horizon > 0:
        raise ValueError(f"kl_horizon must be > 0 (responses), got {horizon}")
    error = min(max(float(current_kl) / float(target) - 1.0, -ADAPTIVE_KL_CLIP), ADAPTIVE_KL_CLIP)
    return float(kl_coef) * (1.0 + error * float(n_steps) / float(horizon))
