"""Policy losses under one signature, picked by name from `POLICY_LOSSES` ("grpo", "ppo_clip").

Every entry is

    fn(logp, old_logp, advantages, mask, *, ref_logp=None, entropy=None, clip_low=0.2, clip_high=None,
       agg="token-mean", max_len=None, beta=0.0, kl_kind="k3", ent_coef=0.0) -> (loss, stats)

Shapes: logp, old_logp, mask (B, T); advantages (B,) (one per sequence, broadcast over its tokens) or
(B, T); ref_logp (B, T) or None; entropy (B, T) per-token entropy or None. The loss is a scalar with
gradients; stats are detached 0-dim tensors and always hold "policy_loss" (the aggregated clipped
surrogate alone), "clip_fraction", "approx_kl", "ratio_mean", "kl" (0 without a KL term) and, when
`entropy` is given, "entropy" = aggregate(entropy, mask, agg, max_len).

- "grpo":     `grpo_loss` (surrogate and beta * KL summed per token, then aggregated), minus
              ent_coef * aggregated entropy when entropy is given and ent_coef != 0.
- "ppo_clip": `policy_loss` (the aggregated surrogate) - ent_coef * aggregated entropy, plus
              beta * aggregate(KL) when ref_logp is given and beta != 0 (InstructGPT's PPO puts the KL
              into the reward instead, so PPO leaves beta = 0 here).

What this simplifies: the entropy bonus is the exact per-token entropy aggregated like the loss (not the
slides' one-sample -log pi estimate), and with ent_coef = 0 it does not enter the loss at all for "grpo",
so the loss is bit-identical to `grpo_loss`. Formulas and citations: docs/math.md.
"""

from __future__ import annotations

import inspect
from collections import namedtuple
from typing import Callable

import torch
from torch import Tensor

from lightning_rlhf.functional.losses import _check_kl_args, _kl_term, aggregate, grpo_loss, policy_loss
from lightning_rlhf.functional.masked import _check_mask
from lightning_rlhf.functional.registries import POLICY_LOSSES

LossResult = tuple[Tensor, dict[str, Tensor]]


# The keyword arguments every POLICY_LOSSES entry takes, with their defaults (one source for both entries).
_DEFAULTS = dict(ref_logp=None, entropy=None, clip_low=0.2, clip_high=None, agg="token-mean", max_len=None, beta=0.0,
                 kl_kind="k3", ent_coef=0.0)
PolicyLossOptions = namedtuple("PolicyLossOptions", list(_DEFAULTS), defaults=list(_DEFAULTS.values()))


_P = inspect.Parameter
_ENTRY_SIGNATURE = inspect.Signature(
    [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation="Tensor") for n in ("logp", "old_logp", "advantages", "mask")]
    + [_P(n, _P.KEYWORD_ONLY, default=d) for n, d in _DEFAULTS.items()],
    return_annotation="tuple[Tensor, dict[str, Tensor]]",
)


def _entry(name: str) -> Callable[[Callable[..., LossResult]], Callable[..., LossResult]]:
    """Register `body(logp, old_logp, advantages, mask, opts: PolicyLossOptions)` as POLICY_LOSSES[name]
    with the shared keyword signature; an unknown keyword raises TypeError."""

    def deco(body: Callable[..., LossResult]) -> Callable[..., LossResult]:
        def entry(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, **options) -> LossResult:
            return body(logp, old_logp, advantages, mask, PolicyLossOptions(**options))

        entry.__name__, entry.__qualname__, entry.__doc__ = body.__name__, body.__qualname__, body.__doc__
        entry.__module__ = body.__module__
        entry.__signature__ = _ENTRY_SIGNATURE  # type: ignore[attr-defined]
        return POLICY_LOSSES.register(name)(entry)

    return deco


def _entropy_bonus(o: PolicyLossOptions, mask: Tensor, with_grad: bool) -> Tensor | None:
    """aggregate(entropy, mask, agg, max_len), with gradients only if `with_grad`; None without entropy."""
    if o.entropy is None:
        return None
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return aggregate(o.entropy, mask, o.agg, o.max_len)


@_entry("grpo")
def grpo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, o: PolicyLossOptions
) -> LossResult:
    """GRPO loss (`grpo_loss`: Shao et al. 2024, eq. 3) - ent_coef * aggregated entropy (if any).

    With ent_coef == 0 the loss is `grpo_loss`'s own tensor (the entropy is only logged).
    """
    loss, stats = grpo_loss(
        logp, old_logp, o.ref_logp, advantages, mask, beta=o.beta, clip_low=o.clip_low,
        clip_high=o.clip_high, agg=o.agg, kl_kind=o.kl_kind, max_len=o.max_len,
    )
    ent = _entropy_bonus(o, mask, with_grad=o.ent_coef != 0)
    if ent is not None:
        if o.ent_coef != 0:
            loss = loss - o.ent_coef * ent
        stats["entropy"] = ent.detach()
    return loss, stats


@_entry("ppo_clip")
def ppo_clip_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, o: PolicyLossOptions
) -> LossResult:
    """PPO clipped surrogate (`policy_loss`: Schulman et al. 2017, eq. 7) - ent_coef * entropy [+ beta KL].

    With entropy given the loss is exactly `surrogate - ent_coef * ent` (as the PPO trainer computes it);
    the KL term beta * aggregate(kl_t) is added only when ref_logp is given and beta != 0.
    """
    _check_kl_args(logp, o.ref_logp, o.kl_kind)
    surrogate, stats = policy_loss(
        logp, old_logp, advantages, mask, clip_low=o.clip_low, clip_high=o.clip_high, agg=o.agg,
        max_len=o.max_len,
    )
    loss = surrogate
    stats["policy_loss"] = surrogate.detach()
    ent = _entropy_bonus(o, mask, with_grad=True)
    if ent is not None:
        loss = surrogate - o.ent_coef * ent
        stats["entropy"] = ent.detach()
    keep = _check_mask(logp, mask)
    kl_mat, stats["kl"] = _kl_term(logp, o.ref_logp, keep, o.beta, o.kl_kind, surrogate.dtype)
    if kl_mat is not None:
        loss = loss + o.beta * aggregate(kl_mat, mask, o.agg, o.max_len)
    return loss, stats
