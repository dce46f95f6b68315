"""A lean forward pass of Llama-family decoders (Llama, Mistral, Qwen2) for sampling, over a static KV cache.

`LeanLlama.from_model(model, dtype)` takes the weights of a Hugging Face causal LM, cast to the sampling
dtype (the parameters themselves, no copy, when the dtype is the model's and oneDNN's weight layout does not
pay; where it pays, q/k/v and gate/up are stacked into one matmul each, see `_Side`). It reuses the model's
own rotary-embedding module (so every RoPE scaling variant the model has is honoured) and reproduces its
RMSNorm and attention exactly:

    prefill(ids, mask)            one causal pass over left-padded prompts -> last-position logits, and
                                  the keys/values of every layer, to be written into the cache;
    decode(tokens, pos, cache, i) one token per row at cache column i -> logits (rows, V).

Only the last position's logits are computed. Decode attention folds the query heads that share a
key/value head into the query-length axis, so grouped-query attention reads the cache without copying it.
Projections go through `PackedLinear` (oneDNN's weight layout, made once per rollout, where it pays).

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

from lightning_rlhf.models.cpu_linear import PackedLinear
from lightning_rlhf.models.lora import lora_parts, lora_unsupported_reason, unwrap_peft
from lightning_rlhf.rollout import cpu_kernels, decode_step

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


def _weights(dtype: torch.dtype, module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """A projection's weight and bias in `dtype`: the parameters themselves when the dtype matches and no LoRA
    adapter is active; with adapters, a copy with them merged in (W + scaling * B A, in float32)."""
    linear, adapters = lora_parts(module)
    bias = None if linear.bias is None else linear.bias.detach().to(dtype)
    weight = linear.weight.detach()
    if adapters:
        weight = weight.float() + sum(s * (b.detach().float() @ a.detach().float()) for a, b, s in adapters)
    return weight.to(dtype), bias


def _linear(dtype: torch.dtype, module: torch.nn.Module, rows: int) -> PackedLinear:
    return PackedLinear(*_weights(dtype, module), rows)


STACK_COPY_BYTES = 8 << 20  # unpacked weights of a `_Side` up to this size together are copied into one stack


class _Side:
    """Projections that read the same input (q, k, v; gate, up), called together -> their outputs. One matmul over
    their stacked weight where it gets oneDNN's layout (`PackedLinear.pays`: a copy is made then anyway) or is
    small (STACK_COPY_BYTES: a small model's decode step is mostly per-call overhead; one call instead of three,
    and no cat of q and k, took a quarter off a tiny Llama's step, 1.9 against 2.6 ms, medians of five
    alternating runs); otherwise one call each, on the parameters themselves (no copy of a large model's)."""

    def __init__(self, dtype: torch.dtype, modules: list[torch.nn.Module], rows: int) -> None:
        parts = [_weights(dtype, m) for m in modules]
        self.sizes = [w.shape[0] for w, _ in parts]
        small = sum(w.numel() * w.element_size() for w, _ in parts) <= STACK_COPY_BYTES
        if small or PackedLinear.pays(parts[0][0], rows, sum(self.sizes)):
            self.linears = [PackedLinear(*decode_step.stack(parts), rows)]
        else:
            self.linears = [PackedLinear(w, b, rows) for w, b in parts]

    def __call__(self, x: Tensor, groups: tuple[int, ...] | None = None) -> list[Tensor]:
        """The outputs, in order; `groups` joins consecutive ones, e.g. (2, 1): [cat(q, k), v] (a view of the
        stacked output, where there is one; else a copy)."""
        groups = groups or (1,) * len(self.sizes)
        ends = [sum(groups[:i + 1]) for i in range(len(groups))]
        if len(self.linears) == 1:
            return list(self.linears[0](x).split([sum(self.sizes[e - g:e]) for g, e in zip(groups, ends)], dim=-1))
        outs = [linear(x) for linear in self.linears]
        return [outs[e - 1] if g == 1 else torch.cat(outs[e - g:e], dim=-1) for g, e in zip(groups, ends)]


@dataclass
class _Layer:
    ln1: Tensor
    qkv: _Side
    o: PackedLinear
    ln2: Tensor
    gate_up: _Side
    down: PackedLinear


class LeanLlama:
    """Sampling-only forward of a Llama-family model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, rows: int = 1, fused: bool | None = None) -> None:
        cfg, base = model.config, model.model
        self.dtype, self.eps, self.rows = dtype, cfg.rms_norm_eps, rows
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        device = base.embed_tokens.weight.device
        usable = fused is not False and cpu_kernels.usable(dtype, self.head_dim, device)
        if fused and not usable:
            raise ValueError(f"fused CPU decode kernels asked for, but they need a float32 or bfloat16 model on a "
                             f"CPU with a head size that is a multiple of 16 and a C compiler (here: {dtype}, "
                             f"{device}, head size {self.head_dim}); leave rollout.engine_kwargs.cpu_kernels unset "
                             "to use them where they work")
        self.fused = usable
        self.rotary = base.rotary_emb
        self._rope_table: tuple[Tensor, Tensor] | None = None  # float32 cos, signed sin by position (`rope_table`)
        # the attention scale, folded into the query heads' rotation (`rope`): (heads + kv_heads, 1, 1)
        self.qk_scale = torch.ones(self.heads + self.kv_heads, 1, 1, device=device)
        self.qk_scale[:self.heads] = self.head_dim**-0.5
        self.embed = base.embed_tokens.weight.detach().to(dtype)
        self.norm = base.norm.weight.detach().to(dtype)
        self.step = self._small_step(model) if self.fused else None  # `_decode_fused` in one call, where it pays
        self.lm_head, self.layers = None, []  # with the one-call step, prefill and decode need no projections
        if self.step is None:
            self.lm_head = _linear(dtype, model.get_output_embeddings(), self.rows)
            self.layers = [self._layer(layer) for layer in base.layers]
        self.num_layers = len(base.layers)

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype | None = None, rows: int = 1,
                   fused: bool | None = None) -> LeanLlama:
        """`rows`: the decode batch expected (it sizes oneDNN's weight layout, see `PackedLinear`). `fused`: decode
        with the fused CPU kernels (`cpu_kernels.py`); None uses them where they work, False never."""
        model = unwrap_peft(model)
        with torch.no_grad():
            return cls(model, dtype or next(model.parameters()).dtype, rows, fused)

    def _layer(self, layer: torch.nn.Module) -> _Layer:
        att, mlp, dt, n = layer.self_attn, layer.mlp, self.dtype, self.rows
        return _Layer(layer.input_layernorm.weight.detach().to(dt),
                      _Side(dt, [att.q_proj, att.k_proj, att.v_proj], n), _linear(dt, att.o_proj, n),
                      layer.post_attention_layernorm.weight.detach().to(dt),
                      _Side(dt, [mlp.gate_proj, mlp.up_proj], n), _linear(dt, mlp.down_proj, n))

    def _small_step(self, model: torch.nn.Module) -> decode_step.DecodeStep | None:
        """The whole decode step as one kernel call (`decode_step.py`) for a small float32 model; else None."""
        decoder, head = model.model.layers, model.get_output_embeddings()
        size = 4 * (sum(p.numel() for p in decoder.parameters()) + head.weight.numel())
        if not decode_step.pays(size, self.dtype, self.embed.device):
            return None
        layers = []
        for layer in decoder:
            att, mlp = layer.self_attn, layer.mlp
            parts = {"q": att.q_proj, "k": att.k_proj, "v": att.v_proj, "o": att.o_proj, "gate": mlp.gate_proj,
                     "up": mlp.up_proj, "down": mlp.down_proj}
            norms = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight}
            layers.append({name: _weights(self.dtype, m) for name, m in parts.items()}
                          | {name: w.detach().to(self.dtype) for name, w in norms.items()})
        return decode_step.DecodeStep(layers, self.embed, self.norm, _weights(self.dtype, head), self.heads,
                                      self.kv_heads, self.head_dim, self.eps)

    # ---- building blocks -------------------------------------------------------------------------
    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        """HF's RMSNorm: normalised in float32, rounded to x's dtype, then times the weight (`F.rms_norm` of a
        bf16/fp16 input computes in float32 and rounds once: the same numbers without two dtype copies)."""
        return weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def rope(self, positions: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """cos, signed sin (n, heads + kv_heads, s, head_dim) for positions (n, s), from the model's own rotary
        module. The signed sin has its first half negated, so that rotating is `x * cos + x.roll(half) * sin`
        (`_rotate`); the query heads' rows are times the attention scale 1/sqrt(head_dim), so a rotated query
        times a key is the scaled score (exact in any dtype when head_dim is a power of 4, e.g. 64). In `dtype`,
        default the model's."""
        dtype = dtype or self.dtype
        cos, sin = self.rotary(self.embed[:1].to(dtype), positions)  # the rotary module returns x's dtype
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return (cos[:, None] * self.qk_scale).to(dtype), (sin[:, None] * self.qk_scale).to(dtype)

    @staticmethod
    def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
        """HF's `x * cos + rotate_half(x) * sin`: rotate_half(x) is cat(-x2, x1), and x.roll(half) is cat(x2, x1)
        (the sign is in `signed_sin`); three kernels instead of six."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)

    def _qkv(self, layer: _Layer, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, s, _ = h.shape
        hd = self.head_dim
        qk, v = layer.qkv(h, groups=(2, 1))  # q and k joined: one rotation for both
        qk = qk.view(n, s, self.heads + self.kv_heads, hd).transpose(1, 2)
        q, k = self._rotate(qk, cos, sin).split([self.heads, self.kv_heads], dim=1)
        return q, k, v.view(n, s, self.kv_heads, hd).transpose(1, 2)

    def _mlp_block(self, layer: _Layer, x: Tensor) -> Tensor:
        h = self._rms(x, layer.ln2)
        gate, up = layer.gate_up(h)
        return x + layer.down(F.silu(gate) * up)

    def logits(self, h: Tensor) -> Tensor:
        """(n, D) last hidden states -> (n, V) float32 logits."""
        return self.lm_head(self._rms(h, self.norm)).float()

    # ---- prefill and decode ------------------------------------------------------------------------
    def prefill(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Left-padded prompts (B, P) -> (last-position logits (B, V), per layer (k, v) (B, Hkv, P, hd)). With the
        one-call step (`self.step`), the prompts run through it as generated tokens, and the keys and values come
        back already in the kernels' cache layout (a `CacheLayout` list, which `new_cache` takes as it is)."""
        p = ids.shape[1]
        if self.step is not None:
            if p == 0:
                raise ValueError("prefill: the prompts have no tokens (at least one is needed)")
            return self._prefill_step(ids, mask)
        real = mask.bool()
        causal = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril()
        own = torch.eye(p, dtype=torch.bool, device=ids.device)  # padded queries see themselves: no empty row
        attn_mask = (causal & (real[:, None, :] | own))[:, None]
        cos, sin = self.rope((mask.long().cumsum(-1) - 1).clamp(min=0))
        x, kvs = F.embedding(ids, self.embed), []
        for layer in self.layers:
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True, scale=1.0)
            x = x + layer.o(out.transpose(1, 2).reshape(*x.shape[:2], -1))
            x = self._mlp_block(layer, x)
            kvs.append((k, v))
        return self.logits(x[:, -1]), kvs

    def _prefill_step(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """`prefill` through the one-call step: each prompt's P tokens as P steps of a cache with no prompt part,
        each prompt's left padding masked (a padding token attends to itself only, as in `prefill`)."""
        b, p = ids.shape
        empty = torch.empty(b, self.kv_heads, 0, self.head_dim, device=ids.device)
        cache = SharedPromptKVCache([(empty, empty)] * self.num_layers, mask[:, :0], 1, p)
        mask = mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0).reshape(-1)
        logits = self.run_step(ids.reshape(-1).contiguous(), positions, cache, 0, steps=p, masked=(1 - mask).sum(1))
        return logits.view(b, p, -1)[:, -1], CacheLayout(cache.kv)

    def decode(self, tokens: Tensor, positions: Tensor, cache: StaticKVCache, column: int) -> Tensor:
        """One new token per cache row (tokens, positions (n,)) written at `column` -> logits (n, V): float32, or
        with `fused` in the model's dtype (the sampler reads bfloat16 logits as they are; `sample_tokens`).

        Attention is written out (scores, softmax in float32, weights back to the sampling dtype, times
        values, as transformers' eager attention does): two batched matmuls over the written columns of the
        cache, keys stored transposed. `scaled_dot_product_attention` took about twice as long for one query
        per row (SmolLM2-135M, 64 rows). With `fused`, `_decode_fused` does the same step with the fused CPU
        kernels instead."""
        if self.fused:
            return self._decode_fused(tokens, positions, cache, column)
        n, hd, rep, width = tokens.shape[0], self.head_dim, self.heads // self.kv_heads, column + 1
        cos, sin = self.rope(positions[:, None])
        bias = None if cache.bias is None else cache.bias[:, None, None, :width]
        x = F.embedding(tokens[:, None], self.embed)
        for layer, (kc, vc) in zip(self.layers, cache.kv):
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), cos, sin)
            kc[:, :, :, column] = k[:, :, 0]
            vc[:, :, column] = v[:, :, 0]
            scores = torch.matmul(q.reshape(n, self.kv_heads, rep, hd), kc[..., :width])  # q is pre-scaled
            scores = scores if bias is None else scores + bias  # bias is float32: so is the sum
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(vc.dtype)
            out = torch.matmul(weights, vc[:, :, :width])
            x = x + layer.o(out.reshape(n, 1, -1))
            x = self._mlp_block(layer, x)
        return self.logits(x[:, 0])

    def _decode_fused(self, tokens: Tensor, positions: Tensor, cache: SharedPromptKVCache, column: int) -> Tensor:
        """`decode` through `cpu_kernels`: per layer, four projections (torch's) and four fused kernels. The
        residual stream `x` is updated in place: each residual add rides on the next RMSNorm. For a bfloat16 model
        the rotation and the attention's sums run in float32 too; the queries and the attention weights stay
        float32 as well, except with the CPU's bfloat16 dot products (`cpu_kernels.pairs_layout`), which round them
        to bfloat16 first, as the eager step does. A small float32 model does all of it in one call (`self.step`)."""
        n, hd, k = tokens.shape[0], self.head_dim, cpu_kernels
        if self.step is not None:
            return self.run_step(tokens, positions, cache, column)
        cos, sin = self._rope_rows(positions)
        new = column - cache.prompt_width  # the column of the generated part
        x, pending = F.embedding(tokens, self.embed), None
        for layer, (kc, vc), (pk, pv) in zip(self.layers, cache.kv, cache.prompt):
            h = k.add_rms_norm(x, pending, layer.ln1, self.eps)
            qk, v = layer.qkv(h, groups=(2, 1))
            q, new_k = k.rope(qk.view(n, -1, hd), cos, sin, self.heads)
            out = k.attend(q, pk, pv, cache.prompt_width, cache.bias, cache.prompt_of_row, kc, vc, new_k,
                           v.view(n, -1, hd), new + 1)
            h = k.add_rms_norm(x, layer.o(out.view(n, -1)), layer.ln2, self.eps)
            gate, up = layer.gate_up(h)
            pending = layer.down(k.silu_mul(gate, up))
        return self.lm_head(k.add_rms_norm(x, pending, self.norm, self.eps))  # the model's dtype: see `decode`

    def run_step(self, tokens: Tensor, positions: Tensor, cache: SharedPromptKVCache, column: int, steps: int = 1,
                 masked: Tensor | None = None) -> Tensor:
        """`self.step` (the one-call step) at these positions: reading the rotation tables by position, so that no
        per-row copy of them is made (a position is at most its cache column, so tables up to the last column
        cover every row)."""
        table = self.rope_table(column + steps)
        if table is None:
            cos, sin = self._rope_rows(positions)
            return self.step(tokens, cos, sin, cache, column, steps=steps, masked=masked)
        return self.step(tokens, *table, cache, column, steps=steps, masked=masked, positions=positions)

    def rope_table(self, top: int) -> tuple[Tensor, Tensor] | None:
        """float32 cos, signed sin (positions, heads + kv_heads, hd) for at least the positions below `top`, made by
        the rotary module once for every position up to twice the largest asked; None for "dynamic" and
        "longrope" RoPE scaling, whose values depend on the sequence length (computed each step instead)."""
        if getattr(self.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            return None
        if self._rope_table is None or self._rope_table[0].shape[0] < top:
            cos, sin = self.rope(torch.arange(2 * top, device=self.embed.device)[None], torch.float32)
            self._rope_table = (cos[0].transpose(0, 1).contiguous(), sin[0].transpose(0, 1).contiguous())
        return self._rope_table

    def _rope_rows(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """float32 cos, signed sin (n, heads + kv_heads, hd) at one position per row: rows of `rope_table`, or
        computed for these positions where there is none."""
        table = self.rope_table(int(positions.max()) + 1)
        if table is None:
            cos, sin = self.rope(positions[:, None], torch.float32)
            return cos.flatten(1, 2), sin.flatten(1, 2)
        return table[0][positions], table[1][positions]

    def new_cache(self, prompt_kvs: list[tuple[Tensor, Tensor]], prompt_mask: Tensor, repeat: int,
                  new_columns: int) -> StaticKVCache | SharedPromptKVCache:
        """The cache `decode` takes, after `prefill` of these prompts: `repeat` rows per prompt, room for
        `new_columns` generated tokens each (the fused kernels read each prompt's part once per prompt)."""
        if self.fused:
            return SharedPromptKVCache(prompt_kvs, prompt_mask, repeat, new_columns)
        return StaticKVCache(self, prompt_kvs, prompt_mask, repeat, prompt_mask.shape[1] + new_columns)


class StaticKVCache:
    """The eager decode's cache (`SharedPromptKVCache` is the fused kernels'). Keys (rows, Hkv, hd, columns: stored
    transposed) and values (rows, Hkv, columns, hd) of every layer, each row with its own copy of its prompt's,
    allocated once. `bias` (rows, columns) is 0 where a row attends (its real prompt tokens and everything it
    generated) and -inf at its prompt's padding; None when no prompt has padding."""

    def __init__(self, model: LeanLlama, prompt_kvs: list[tuple[Tensor, Tensor]], prompt_mask: Tensor,
                 repeat: int, columns: int) -> None:
        rows, p = prompt_mask.shape[0] * repeat, prompt_mask.shape[1]
        device = prompt_mask.device
        shape = (rows, model.kv_heads, columns, model.head_dim)
        self.kv = []
        for k, v in prompt_kvs:
            kc = torch.empty(shape, dtype=k.dtype, device=device).transpose(2, 3).contiguous()
            vc = torch.empty(shape, dtype=v.dtype, device=device)
            kc[..., :p] = k.transpose(2, 3).repeat_interleave(repeat, dim=0)
            vc[:, :, :p] = v.repeat_interleave(repeat, dim=0)
            self.kv.append((kc, vc))
        self.bias = None
        if not bool(prompt_mask.bool().all()):
            self.bias = torch.zeros(rows, columns, device=device)
            self.bias[:, :p].masked_fill_(~prompt_mask.bool().repeat_interleave(repeat, dim=0), float("-inf"))

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (indices into the current rows), compacting the cache."""
        self.kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv]
        self.bias = None if self.bias is None else self.bias.index_select(0, rows)


class CacheLayout(list):
    """Per layer (keys, values) already in the kernels' cache layout (`prefill` through the one-call step)."""


class SharedPromptKVCache:
    """The fused decode's cache. The prompt part: each prompt's keys and values (prompts, Hkv, P, hd) once, read
    by all the rows sampled from it (`prompt_of_row`); `bias` (prompts, P) is 0 at real prompt tokens and -inf at
    padding, None when no prompt has padding. The generated part: each row's keys and values, allocated once for
    every new token. All in the kernels' layout (`cpu_kernels.cache_keys`, `cache_values`: columns in blocks of
    32, keys transposed in each block; bfloat16 with the CPU's bfloat16 dot products, in pairs)."""

    def __init__(self, prompt_kvs: list[tuple[Tensor, Tensor]], prompt_mask: Tensor, repeat: int,
                 new_columns: int) -> None:
        prompts, p = prompt_mask.shape
        rows, device, self.prompt_width = prompts * repeat, prompt_mask.device, p
        self.prompt = (list(prompt_kvs) if isinstance(prompt_kvs, CacheLayout)
                       else [(cpu_kernels.cache_keys(k), cpu_kernels.cache_values(v)) for k, v in prompt_kvs])
        self.kv = []
        for _, v in prompt_kvs:  # an empty (rows, Hkv, 0, hd) stands for "room for new_columns, nothing yet"
            empty = v.new_empty(rows, v.shape[1], 0, v.shape[3])
            self.kv.append((cpu_kernels.cache_keys(empty, new_columns), cpu_kernels.cache_values(empty, new_columns)))
        self.prompt_of_row = torch.arange(prompts, device=device).repeat_interleave(repeat)
        real = prompt_mask.bool()
        self.bias = None if bool(real.all()) else torch.zeros(real.shape, device=device).masked_fill(~real, -torch.inf)

    def keep(self, rows: Tensor) -> None:
        """Drop every row not in `rows` (indices into the current rows); the prompt part stays as it is."""
        self.kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv]
        self.prompt_of_row = self.prompt_of_row.index_select(0, rows)
