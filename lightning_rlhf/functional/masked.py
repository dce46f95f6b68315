"""Masked reductions over response tokens: sum, mean, variance and whitening.

`mask` is (B, T) (or any shape equal to `x`'s), 1 on real response tokens and 0 on padding; it may be
bool or float. Padding positions are *selected away* (``torch.where``), not multiplied by zero, so a NaN
or inf sitting at a padded position never reaches the result or its gradient.

Simplifications and choices:
- An all-padding mask gives a mean of 0 rather than NaN, so an empty batch adds nothing to a loss.
- Everything is computed in float32 or wider: bf16/fp16 inputs are upcast, float64 stays float64.
- Whitening "over the batch across all ranks" (PPO advantages, REINFORCE++; docs/math.md, "Whitening")
  is `masked_whiten_all`: it takes an `all_reduce` callable (element-wise sum over ranks) instead of a
  process group, so it stays a pure function; without one it is exactly `masked_whiten`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _as_float(x: Tensor) -> Tensor:
    """Upcast to float32 unless already float32 or wider."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def _check_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Return `mask` as a bool tensor, after checking it has `x`'s shape."""
    if mask.shape != x.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match values shape {tuple(x.shape)}; "
            "pass a mask with one entry per value (1 on real response tokens, 0 on padding)"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_weights(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return (x zeroed at padding, float weights zero at padding), both float32 or wider."""
    keep = _check_mask(x, mask)
    x = _as_float(x)
    w = mask.to(x.dtype) if mask.dtype != torch.bool else keep.to(x.dtype)
    return torch.where(keep, x * w, torch.zeros((), dtype=x.dtype, device=x.device)), w


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over real tokens: sum(x * mask) over `dim` (over everything when None).

    Shapes: x, mask (B, T) -> scalar (dim=None) or x with `dim` reduced.
    """
    xw, _ = _masked_weights(x, mask)
    return xw.sum() if dim is None else xw.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over real tokens: sum(x * mask) / sum(mask) over `dim` (everything when None).

    Shapes: x, mask (B, T) -> scalar (dim=None) or x with `dim` reduced. Rows (or a whole mask) with no
    real token give 0, not NaN.
    """
    xw, w = _masked_weights(x, mask)
    total = xw.sum() if dim is None else xw.sum(dim=dim)
    count = w.sum() if dim is None else w.sum(dim=dim)
    # sum is exactly 0 wherever count is 0, so clamping the count only turns 0/0 into 0.
    return total / count.clamp_min(torch.finfo(count.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over all real tokens (a scalar).

    Shapes: x, mask (B, T) -> scalar. `unbiased=True` applies Bessel's correction n / (n - 1) with
    n = sum(mask); that needs at least two real tokens (ValueError otherwise, since the unbiased
    variance of one number is undefined).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((_as_float(x) - mean) ** 2, mask)
    if unbiased:
        n = _masked_weights(x, mask)[1].sum()
        if float(n) < 2:
            raise ValueError(
                f"unbiased masked variance needs at least 2 real tokens, the mask has {float(n):g}; "
                "pass a mask with more real tokens or use unbiased=False"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten `x` over its real tokens: (x - masked mean) / sqrt(masked unbiased var + eps).

    Shapes: x, mask (B, T) -> (B, T), 0 at padding. With `shift_mean=False` the mean is added back
    (only the scale is normalised), as in the PPO implementations that whiten rewards.
    Used for PPO advantages (docs/math.md, "Whitening"); the statistics are over the real tokens of `x`
    only (see `masked_whiten_all` for statistics over all ranks).
    """
    keep = _check_mask(x, mask)
    xf = _as_float(x)
    mean = masked_mean(xf, mask)
    var = masked_var(xf, mask, unbiased=True)
    white = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(keep, white, torch.zeros((), dtype=white.dtype, device=white.device))


def masked_whiten_all(
    x: Tensor, mask: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None, eps: float = 1e-8
) -> Tensor:
    """`masked_whiten` with the mean and unbiased variance over the real tokens of ALL ranks.

    Shapes: x, mask (B, T) -> (B, T), 0 at padding, float32 (float64 stays float64).
    `all_reduce(t)` must return the element-wise SUM of `t` over all ranks (e.g. a wrapper around
    `torch.distributed.all_reduce`); with `all_reduce=None` (one process) this is exactly
    `masked_whiten(x, mask, eps=eps)`. Otherwise, in float64:

        S = sum_ranks sum_real x,   Q = sum_ranks sum_real x^2,   n = number of real tokens (all ranks)
        mean = S / n,   var = (Q / n - mean^2) * n / (n - 1)     (clamped at 0 before Bessel's factor)
        out  = (x - mean) * rsqrt(var + eps)

    ValueError if fewer than 2 real tokens in total. The mask is read as 0/1 (real or padding).
    """
    if all_reduce is None:
        return masked_whiten(x, mask, eps=eps)
    keep = _check_mask(x, mask)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xd = torch.where(keep, x.double(), zero)
    local = torch.stack([xd.sum(), (xd * xd).sum(), keep.double().sum()])
    total, sq_total, n = all_reduce(local).to(device=x.device, dtype=torch.float64)
    if float(n) < 2:
        raise ValueError(
            f"whitening needs at least 2 real tokens across all ranks, got {float(n):g}; "
            "pass a batch with more response tokens"
        )
    mean = total / n
    var = (sq_total / n - mean * mean).clamp(min=0) * n / (n - 1)
    out = torch.where(keep, (xd - mean) * torch.rsqrt(var + eps), zero)
    return out.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
