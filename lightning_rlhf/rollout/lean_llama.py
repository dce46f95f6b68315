"""A lean forward pass of Llama-family decoders (Llama, Mistral, Qwen2) for sampling, over a static KV cache.

`LeanLlama.from_model(model, dtype)` takes the weights of a Hugging Face causal LM, cast to the sampling
dtype (the parameters themselves, no copy, when the dtype is the model's; fusing q/k/v or gate/up into one
matmul was measured and gained nothing at these sizes, so it costs no memory either). It reuses the model's own rotary-embedding module (so every RoPE scaling variant the model has is
honoured) and reproduces its RMSNorm and attention exactly:

    prefill(ids, mask)            one causal pass over left-padded prompts -> last-position logits, and
                                  the keys/values of every layer, to be written into the cache;
    decode(tokens, pos, cache, i) one token per row at cache column i -> logits (rows, V).

Only the last position's logits are computed. Decode attention folds the query heads that share a
key/value head into the query-length axis, so grouped-query attention reads the cache without copying it.

A PEFT (LoRA) model runs as its base model with each projection's active adapters merged into a copy of its
weight for the rollout (W + alpha/r * B A; the decode loop then costs what it costs without LoRA, and the copy of
a 135M model's projections, 0.4 GB in fp32, lives for one rollout). Adapters switched off (`disable_adapter()`)
are skipped, so no copy is made. Other PEFT layers (DoRA, LoRA on embeddings, ...) are refused.

Simplified: no sliding-window attention (a model that needs it is refused, see `unsupported_reason`), no
q/k norms (Qwen3, Gemma are refused), no tensor parallelism. Weights are copied once per `from_model`
call in another dtype, so a rollout sees the policy as it is at that moment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rlhf.models.lora import lora_parts, lora_unsupported_reason, unwrap_peft

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def unsupported_reason(model: torch.nn.Module, max_positions: int) -> str | None:
    """Why `LeanLlama` cannot run `model` (None when it can)."""
    model = unwrap_peft(model)
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model_type {kind!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and max_positions > window:
        return f"sliding-window attention ({window} tokens) is not implemented"
    if not hasattr(getattr(model, "model", None), "rotary_emb"):
        return "the model has no rotary_emb module"
    return lora_unsupported_reason(model)


def _linear(dtype: torch.dtype, module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a projection in `dtype`: the parameters themselves (no copy) when the dtype matches and
    no LoRA adapter is active; with adapters, a copy with them merged in (W + scaling * B A, in float32)."""
    linear, adapters = lora_parts(module)
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    weight = linear.weight.detach()
    if adapters:
        weight = weight.float() + sum(s * (b.detach().float() @ a.detach().float()) for a, b, s in adapters)
    return weight.to(dtype), bias


@dataclass
class _Layer:
    ln1: Tensor
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    ln2: Tensor
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]


class LeanLlama:
    """Sampling-only forward of a Llama-family model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        cfg, base = model.config, model.model
        self.dtype, self.eps = dtype, cfg.rms_norm_eps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = base.rotary_emb
        self.embed = base.embed_tokens.weight.detach().to(dtype)
        self.norm = base.norm.weight.detach().to(dtype)
        self.lm_head = _linear(dtype, model.get_output_embeddings())
        self.layers = [self._layer(layer) for layer in base.layers]

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype | None = None) -> LeanLlama:
        model = unwrap_peft(model)
        with torch.no_grad():
            return cls(model, dtype or next(model.parameters()).dtype)

    def _layer(self, layer: torch.nn.Module) -> _Layer:
        att, mlp, dt = layer.self_attn, layer.mlp, self.dtype
        return _Layer(layer.input_layernorm.weight.detach().to(dt), _linear(dt, att.q_proj), _linear(dt, att.k_proj),
                      _linear(dt, att.v_proj), _linear(dt, att.o_proj),
                      layer.post_attention_layernorm.weight.detach().to(dt), _linear(dt, mlp.gate_proj),
                      _linear(dt, mlp.up_proj), _linear(dt, mlp.down_proj))

    # ---- building blocks -------------------------------------------------------------------------
    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        """HF's RMSNorm (in float32, then back to x's dtype, then times the weight) as one fused kernel."""
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (n, 1, s, head_dim) for positions (n, s), from the model's own rotary module."""
        cos, sin = self.rotary(self.embed[:1], positions)
        return cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None]

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _qkv(self, layer: _Layer, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, s, _ = h.shape
        hd = self.head_dim
        q, k, v = F.linear(h, *layer.q), F.linear(h, *layer.k), F.linear(h, *layer.v)
        qk = torch.cat([q, k], dim=-1).view(n, s, self.heads + self.kv_heads, hd).transpose(1, 2)
        q, k = self._rotate(qk, cos, sin).split([self.heads, self.kv_heads], dim=1)  # one rotation for both
        return q, k, v.view(n, s, self.kv_heads, hd).transpose(1, 2)

    def _mlp_block(self, layer: _Layer, x: Tensor) -> Tensor:
        h = self._rms(x, layer.ln2)
        return x + F.linear(F.silu(F.linear(h, *layer.gate)) * F.linear(h, *layer.up), *layer.down)

    def logits(self, h: Tensor) -> Tensor:
        """(n, D) last hidden states -> (n, V) float32 logits."""
        return F.linear(self._rms(h, self.norm), *self.lm_head).float()

    # ---- prefill and decode ------------------------------------------------------------------------
    def prefill(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Left-padded prompts (B, P) -> (last-position logits (B, V), per layer (k, v) (B, Hkv, P, hd))."""
        p = ids.shape[1]
        real = mask.bool()
        causal = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril()
        own = torch.eye(p, dtype=torch.bool, device=ids.device)  # padded queries see themselves: no empty row
        attn_mask = (causal & (real[:, None, :] | own))[:, None]
        cos, sin = self.rope((mask.long().cumsum(-1) - 1).clamp(min=0))
        x, kvs = F.embedding(ids, self.embed), []
        for layer in self.layers:
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
            x = x + F.linear(out.transpose(1, 2).reshape(*x.shape[:2], -1), *layer.o)
            x = self._mlp_block(layer, x)
            kvs.append((k, v))
        return self.logits(x[:, -1]), kvs

    def decode(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, column: int) -> Tensor:
        """One new token per cache row (tokens, positions (n,)) written at `column` -> logits (n, V)."""
        n, hd, rep = tokens.shape[0], self.head_dim, self.heads // self.kv_heads
        cos, sin = self.rope(positions[:, None])
        attn_mask = cache.real[:, None, None, : column + 1]
        x = F.embedding(tokens[:, None], self.embed)
        for layer, (kc, vc) in zip(self.layers, cache.kv):
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), cos, sin)
            kc[:, :, column : column + 1] = k
            vc[:, :, column : column + 1] = v
            out = F.scaled_dot_product_attention(q.reshape(n, self.kv_heads, rep, hd), kc[:, :, : column + 1],
                                                 vc[:, :, : column + 1], attn_mask=attn_mask)
            x = x + F.linear(out.reshape(n, 1, -1), *layer.o)
            x = self._mlp_block(layer, x)
        return self.logits(x[:, 0])


class StaticKVCache:
    """Keys/values of every layer, (rows, Hkv, columns, hd) each, allocated once; `real` (rows, columns) marks
    the columns a row attends to (its real prompt tokens and everything it generated)."""

    def __init__(self, model: LeanLlama, prompt_kvs: list[tuple[Tensor, Tensor]], prompt_mask: Tensor,
                 repeat: int, columns: int) -> None:
        rows, p = prompt_mask.shape[0] * repeat, prompt_mask.shape[1]
        device = prompt_mask.device
        shape = (rows, model.kv_heads, columns, model.head_dim)
        self.kv = []
        for k, v in prompt_kvs:
            kc, vc = torch.empty(shape, dtype=k.dtype, device=device), torch.empty(shape, dtype=v.dtype, device=device)
            kc[:, :, :p] = k.repeat_interleave(repeat, dim=0)
            vc[:, :, :p] = v.repeat_interleave(repeat, dim=0)
            self.kv.append((kc, vc))
        self.real = torch.ones(rows, columns, dtype=torch.bool, device=device)
        self.real[:, :p] = prompt_mask.bool().repeat_interleave(repeat, dim=0)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (indices into the current rows), compacting the cache."""
        self.kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv]
        self.real = self.real.index_select(0, rows)
