"""Per-token estimators of KL(pi || pi_ref) from the log-probs of sampled tokens.

With tokens sampled from pi and d = ref_logp - logp = log(pi_ref / pi) per token (Schulman, "Approximating
KL Divergence", 2020):

- k1 = -d               unbiased, high variance, can be negative;
- k2 = d^2 / 2          biased, low variance, >= 0;
- k3 = exp(d) - d - 1   unbiased, low variance, >= 0 (DeepSeekMath, Shao et al. 2024, eq. 4; the
                        default for GRPO).

Variants are picked by name from `KL_ESTIMATORS`. For k3, d is clamped to [-20, 20] before exp, so one
token whose log-probs drifted far apart gives a large but finite penalty (exp(20) ~ 4.9e8) instead of inf;
the gradient is zero outside that range.

Simplification in the slides: they write the penalty as D_KL(pi_orig || pi_theta) "averaged over the
sequence and batch"; we estimate KL(pi_theta || pi_ref) per token from the sampled tokens, as InstructGPT
and DeepSeekMath do, and leave averaging to the loss aggregation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.functional.registries import KL_ESTIMATORS

# d is clamped to this range in k3 so exp(d) stays finite.
K3_CLAMP = 20.0


@KL_ESTIMATORS.register("k1")
def kl_k1(d: Tensor) -> Tensor:
    """k1 = -d = log pi - log pi_ref."""
    return -d


@KL_ESTIMATORS.register("k2")
def kl_k2(d: Tensor) -> Tensor:
    """k2 = d^2 / 2."""
    return 0.5 * d * d


@KL_ESTIMATORS.register("k3")
def kl_k3(d: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 = pi_ref/pi - log(pi_ref/pi) - 1, with d clamped to [-20, 20]."""
    d = d.clamp(-K3_CLAMP, K3_CLAMP)
    return torch.expm1(d) - d


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate of kind "k1", "k2" or "k3", with d = ref_logp - logp.

    Shapes: logp, ref_logp (B, T) -> (B, T) float32 (float64 stays float64). No masking here: padded
    positions hold whatever the inputs hold; mask when reducing. Gradients flow to both inputs (detach
    `ref_logp` yourself if it came from a trainable model).
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp shape {tuple(logp.shape)} does not match ref_logp shape {tuple(ref_logp.shape)}; "
            "both must be per-token log-probs of the same sampled tokens"
        )
    estimator = KL_ESTIMATORS.get(kind)
    if logp.dtype not in (torch.float32, torch.float64):
        logp = logp.float()
    if ref_logp.dtype not in (torch.float32, torch.float64):
        ref_logp = ref_logp.float()
    return estimator(ref_logp - logp)
