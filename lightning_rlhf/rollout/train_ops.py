"""RMSNorm and the MLP's SiLU(gate) * up of a small float32 Llama-family model, trained on a CPU, through fused
kernels (`train_kernels.c`): forward and backward each one pass over memory. Also the token log-probs (and entropy)
of any float32 logits on a CPU (`token_logprobs`, used by `teacher_forcing.sequence_logprobs`): two passes over
each row forward and one backward, where the chunked torch version (`functional.logprobs_and_entropy`) takes about
ten; 4-12x faster at a 512-token vocabulary, 9x at SmolLM2's 49k (`benchmarks/small_model_paths.py`).

A small model's update is many short kernels: an HF RMSNorm is 5 kernels forward and about 10 backward
(float32 cast, pow, mean, rsqrt, two products, and their gradients), the SiLU product 2 forward and 3 backward.
`use_fused_training_ops(model)` switches a small float32 model's RMSNorm and MLP modules to subclasses whose
forward calls the fused kernels through autograd functions (the same parameters, state dict and math: float32,
sums in another order, so results differ by rounding, about 1e-7 relative). A call that the kernels do not take
(another dtype or device, autocast) runs the module's own forward.

Simplified: Llama, Mistral and Qwen2 only (their RMSNorm is `w * x / sqrt(mean(x^2) + eps)`, their MLP
`down(silu(gate(x)) * up(x))`); models of at most `decode_step.SMALL_STEP_BYTES` of parameters, where the
per-kernel cost is a large part of the update; the rotary embedding stays the model's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.rollout import cpu_kernels, decode_step
from lightning_rlhf.rollout.lean_llama import SUPPORTED_MODEL_TYPES


def _p(t: Tensor) -> int:
    return t.data_ptr()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = torch.empty_like(x2), x2.new_empty(x2.shape[0])
        cpu_kernels.kernels().lr_rms_norm_fwd(_p(x2), _p(weight), _p(y), _p(rstd), *x2.shape, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x2, weight, rstd = ctx.saved_tensors
        g = grad.reshape(x2.shape).contiguous()
        dx, dw = torch.empty_like(x2), torch.empty_like(weight)
        cpu_kernels.kernels().lr_rms_norm_bwd(_p(x2), _p(weight), _p(rstd), _p(g), _p(dx), _p(dw), *x2.shape)
        return dx.view(grad.shape), dw, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        m = gate.shape[-1]
        cpu_kernels.kernels().lr_silu_mul(_p(gate), m, _p(up), m, _p(out), gate.numel() // m, m)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        g = grad.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        cpu_kernels.kernels().lr_silu_mul_bwd(_p(gate), _p(up), _p(g), _p(dgate), _p(dup), gate.numel())
        return dgate, dup


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token] per row of (n, V) float32 logits, and the entropy, in one kernel call."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, with_entropy: bool):  # type: ignore[override]
        n, v = logits.shape
        stats, logp = logits.new_empty(n, 2), logits.new_empty(n)
        entropy = logits.new_empty(n) if with_entropy else None
        cpu_kernels.kernels().lr_token_logprobs_fwd(_p(logits), _p(tokens), _p(stats), _p(logp),
                                                    _p(entropy) if with_entropy else None, n, v, 1.0 / temperature)
        ctx.save_for_backward(logits, tokens, stats)
        ctx.inv_t = 1.0 / temperature
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_entropy: Tensor | None):  # type: ignore[override]
        logits, tokens, stats = ctx.saved_tensors
        g, dx = grad.contiguous(), torch.empty_like(logits)
        cpu_kernels.kernels().lr_token_logprobs_bwd(_p(logits), _p(tokens), _p(stats), _p(g), _p(dx), *logits.shape,
                                                    ctx.inv_t)
        return dx, None, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                   with_entropy: bool = True) -> tuple[Tensor, Tensor | None] | None:
    """`functional.logprobs_and_entropy` through one fused kernel call forward and one backward, for float32 logits
    (B, T, V) on a CPU; None where it does not take them (another dtype or device, or no kernels built), and the
    caller runs the functional version. Results differ from it by rounding (its exp is torch's, ours `exp8`;
    about 1e-7 relative)."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or cpu_kernels.kernels() is None:
        return None
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match tokens shape {tuple(tokens.shape)}")
    flat_tokens = tokens.reshape(-1).long().contiguous()
    vocab = logits.shape[-1]
    if flat_tokens.numel():  # the kernel indexes each row by its token: one min/max pass, one sync
        low, high = torch.stack(torch.aminmax(flat_tokens)).tolist()
        if not 0 <= low <= high < vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}) (the logits' vocabulary), got {low}..{high}")
    logp, ent = _TokenLogprobs.apply(logits.reshape(-1, vocab).contiguous(), flat_tokens, float(temperature),
                                     with_entropy)
    return logp.reshape(tokens.shape), None if ent is None else ent.reshape(tokens.shape)


def _takes(*tensors: Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def _norm_forward(self, x: Tensor) -> Tensor:
    if not _takes(x, self.weight):
        return super(type(self), self).forward(x)
    return _RMSNorm.apply(x, self.weight, float(self.variance_epsilon))


def _mlp_forward(self, x: Tensor) -> Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not _takes(gate, up):
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(_SiluMul.apply(gate, up))


_FUSED: dict[type, type] = {}


def _fused_class(cls: type, forward) -> type:
    """`cls` with `forward` (made once per class, and named in this module so that pickling finds it)."""
    if cls not in _FUSED:
        name = f"Fused{cls.__name__}"
        _FUSED[cls] = type(name, (cls,), {"forward": forward, "__module__": __name__})
        globals()[name] = _FUSED[cls]
    return _FUSED[cls]


def pays(model: torch.nn.Module) -> bool:
    """Whether `use_fused_training_ops` switches `model`: a Llama, Mistral or Qwen2 with float32 parameters on a
    CPU, at most SMALL_STEP_BYTES of them, and the kernels built."""
    params = list(model.parameters())
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES or not params:
        return False
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return False
    return 4 * sum(p.numel() for p in params) <= decode_step.SMALL_STEP_BYTES and cpu_kernels.kernels() is not None


def use_fused_training_ops(model: torch.nn.Module) -> torch.nn.Module:
    """Switch `model`'s RMSNorm modules and SiLU MLPs to the fused kernels when `pays(model)` (see the module
    docstring); parameters and state dict unchanged. Returns `model`."""
    if not pays(model):
        return model
    for module in model.modules():
        cls = type(module)
        if cls in _FUSED.values():
            continue
        if cls.__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and module.weight.dim() == 1:
            module.__class__ = _fused_class(cls, _norm_forward)
        elif (cls.__name__.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
              and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            module.__class__ = _fused_class(cls, _mlp_forward)
    return model
