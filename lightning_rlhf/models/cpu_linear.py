"""Linear layers through oneDNN on a CPU, where that is faster than torch's default float32 matmul.

On a CPU, torch sends float32 matmuls to MKL and bfloat16 ones to oneDNN. On the AMD EPYC (Zen 5, AVX-512, 2
cores) this project was measured on, MKL's float32 GEMM ran at 175-205 GFLOP/s and oneDNN's at 440-470 on the
same shapes (MKL takes a slower code path on CPUs not made by Intel). Same float32 arithmetic, another
summation order: results differ from MKL's by float32 rounding (about 1e-6 relative), as two BLAS builds do.

- `onednn_linear(x, weight, bias)`: `F.linear`'s math, with all three GEMMs (the output, the input's gradient,
  the weight's gradient) done by oneDNN, for float32 CPU tensors outside autocast and with enough work
  (`MIN_WORK` multiply-adds); anything else goes to `F.linear`.
- `use_onednn_linear(model)`: turns every `nn.Linear` of a model into `OneDNNLinear` (the same parameters and
  state dict, the forward above) when `onednn_pays()`, a probe timed once per process, finds oneDNN at least
  `MARGIN` times faster than `F.linear` here. The loaders call it; on a machine where MKL is as fast, nothing
  changes.
- `PackedLinear`: a weight reordered once into oneDNN's blocked layout, for the rollout engine, whose weights do
  not change during a rollout (decode matmuls of 64 rows read every weight once per token: the reorder that
  `F.linear` does on each call is most of their cost). In float32 a second probe, `packing_pays`, times each
  decode shape, since the answer differs from training's: on an AVX2-only AMD EPYC (Zen 3), MKL won the
  training probe but packed oneDNN was 1.1-2.3x faster at 64 rows (1.5-2.9x at 8).

Simplified: the training probe times one shape (256 x 576 x 1536, a 135M model's MLP); the work threshold was
read off one machine's timings (oneDNN lost only below it).
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_WORK = 1 << 21  # rows x in x out below this, F.linear's smaller call overhead wins
MARGIN = 1.2  # oneDNN for training's linears: a whole path of its own, taken only where clearly faster
PACK_MARGIN = 1.05  # packing a sampler's weight: one reorder per rollout, taken where it is faster at all
ALWAYS_PACK_BYTES = 1 << 20  # float32 sampler weights this large are packed without a probe (see PackedLinear)
ENV = "LIGHTNING_RLHF_ONEDNN"


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this torch build has oneDNN's linear op (every x86 CPU build does) and this CPU runs it in
    `dtype`: oneDNN has no bfloat16 or float16 linear on CPUs without AVX-512 or AVX-NE-CONVERT (an AMD EPYC
    with AVX2 only refused both), so a tiny call and a weight reorder are tried once per dtype."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    try:
        w = torch.ones(4, 4, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype), w, None, "none", [], "")
        torch.ops.mkldnn._reorder_linear_weight(w, 2)
    except RuntimeError:
        return False
    return True


def onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    """a (m, k) @ b (n, k)^T by oneDNN; either may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _worth_it(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast casts F.linear's inputs to bfloat16, whose matmuls already go to oneDNN
    return x.numel() * weight.shape[0] >= MIN_WORK


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.shape = bias is not None, x.shape
        return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "").view(*x.shape[:-1], -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = onednn_mm(g2, weight.t()).view(ctx.shape) if ctx.needs_input_grad[0] else None
        gw = onednn_mm(g2.t(), x2.t()) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, by oneDNN where that is worth it (see the module docstring)."""
    if _worth_it(x, weight):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """`nn.Linear` whose forward is `onednn_linear`; `use_onednn_linear` switches modules to it in place."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)


def _seconds(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _decided() -> bool | None:
    """What the float32 probes answer without timing: False without oneDNN, LIGHTNING_RLHF_ONEDNN=0 or 1 as a
    bool, None when it is unset (measure); a bad value is named."""
    forced = os.environ.get(ENV, "").strip()
    if forced and forced not in ("0", "1"):
        raise ValueError(f"{ENV}={forced!r}: set it to 0 (never use oneDNN's float32 linear), 1 (always) or "
                         "leave it unset (measure which is faster)")
    if not onednn_available():
        return False
    return None if not forced else forced == "1"


@functools.cache
def onednn_pays() -> bool:
    """Whether oneDNN's float32 linear (output and both gradients) is at least MARGIN x faster than
    F.linear's on this CPU, timed once per process (about 0.1 s). The environment variable
    LIGHTNING_RLHF_ONEDNN=0 or 1 decides instead of the probe (A/B timings, or a machine where it misjudges)."""
    decided = _decided()
    if decided is not None:
        return decided
    try:
        x, w, g = torch.randn(256, 576), torch.randn(1536, 576), torch.randn(256, 1536)
        ours = _seconds(lambda: (onednn_mm(x, w), onednn_mm(g, w.t()), onednn_mm(g.t(), x.t())))
        torch_s = _seconds(lambda: (F.linear(x, w), g @ w, g.t() @ x))
    except RuntimeError:
        return False
    return torch_s >= MARGIN * ours


def use_onednn_linear(model: torch.nn.Module, force: bool | None = None) -> torch.nn.Module:
    """Switch every plain `nn.Linear` in `model` to `OneDNNLinear` when `onednn_pays()` (or `force`); the
    parameters, state dict and outputs on any other device or dtype are unchanged. Returns `model`."""
    if not (onednn_pays() if force is None else force):
        return model
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = OneDNNLinear
    return model


@functools.cache
def packing_pays(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a float32 (rows, in) @ (out, in)^T is at least PACK_MARGIN x faster with the weight in oneDNN's
    layout than by F.linear, timed once per shape and process (a few calls each; the largest, a 135M model's lm
    head at 64 rows, takes about 0.3 s). Decode shapes differ from training ones: on an AVX2-only AMD EPYC,
    oneDNN lost the training probe (`onednn_pays`) but was 1.1-2.3x faster with packed weights at 64 rows, where
    MKL's small-row GEMM is weak. LIGHTNING_RLHF_ONEDNN=0 or 1 decides instead."""
    decided = _decided()
    if decided is not None:
        return decided
    x, w = torch.randn(rows, in_features), torch.randn(out_features, in_features)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    repeats = max(2, min(20, int(2e8 // (rows * in_features * out_features))))
    ours = _seconds(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
    torch_s = _seconds(lambda: F.linear(x, w), repeats)
    return torch_s >= PACK_MARGIN * ours


class PackedLinear:
    """A projection for sampling: `weight` (out, in) reordered once for oneDNN when the expected work (`rows`
    x in x out) reaches MIN_WORK on a CPU, in bfloat16 (oneDNN's already, where the CPU has it:
    `onednn_available`) or in float32 where the weight has ALWAYS_PACK_BYTES or more or `packing_pays` measured
    it faster for this shape; otherwise it calls F.linear on the weight as given. Call it on (..., in) inputs.

    Large float32 weights skip the probe: a decode step reads each from memory, not cache, and there packed oneDNN
    beat MKL by 4-6% per SmolLM2 step at 64 rows on an AVX2-only EPYC even for shapes (576 x 576, 576 x 1536)
    where the probe, which times one weight over and over, picked MKL (`python benchmarks/decode_packing.py`)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        self.bias, self.out_features = bias, weight.shape[0]
        self.packed = self.pays(weight, rows)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if self.packed else weight

    @staticmethod
    def pays(like: Tensor, rows: int, out_features: int | None = None) -> bool:
        """Whether a weight with `like`'s device, dtype and input size, and `out_features` outputs (default:
        `like`'s), called on `rows` rows, is reordered by `PackedLinear` (see the class docstring)."""
        out_features = like.shape[0] if out_features is None else out_features
        if like.device.type != "cpu" or rows * like.shape[1] * out_features < MIN_WORK:
            return False
        if like.dtype == torch.bfloat16:
            return onednn_available(like.dtype)
        if like.dtype != torch.float32:
            return False
        if 4 * like.shape[1] * out_features >= ALWAYS_PACK_BYTES and _decided() is not False:
            return True
        return packing_pays(rows, like.shape[1], out_features)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)
