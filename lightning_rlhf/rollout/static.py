"""The fast rollout engine (registered as "static"): a static KV cache and a lean decode loop.

For Llama-family models (`lean_llama.py`) it
  - prefills each prompt once, then copies its keys/values to the G rows that sample from it;
  - preallocates the KV cache for prompt + max_new_tokens columns, so decoding allocates nothing per token
    but the new token's activations;
  - computes logits for the last position only, and keeps each sampled token's log-prob (temperature-
    scaled, before top-k/top-p, as the "hf" engine and the teacher-forced pass do);
  - compacts the batch when rows finish: once fewer than `compact_below` of the rows in the cache are
    still generating, the finished rows are dropped (a copy of the cache, amortised over the steps after);
  - groups prompts of similar length into one call when `max_batch_size` splits the rows (less padding);
  - samples in `dtype` (default: the model's), e.g. bfloat16 on a CPU with native bf16 matmuls;
  - in float32 or bfloat16 on a CPU, decodes with fused C kernels (`cpu_kernels.py`): each residual add with
    the next RMSNorm, RoPE, SiLU with the product, a whole attention (with the cache writes) and the sampling
    in one pass each, over a cache that holds each prompt's keys and values once for all its rows.
Other architectures fall back to the "hf" engine, with one message saying why.

Simplified: the Python loop issues a fixed set of kernels per token and layer (no CUDA graphs, no
torch.compile: on CPU one compiled layer saved 9-13% of a decode step, `benchmarks/decode_compile.py`, for a
compile per process and per batch size, and compiled for dynamic shapes it saved nothing); sampling inverts
the CDF of the filtered distribution with torch's generator, so a seed gives the same tokens run to run, not
HF's tokens; with `prompt_keys` (keyed sampling, `keyed.py`) the uniforms come from each row's key instead.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lightning_rlhf.rollout import cpu_kernels
from lightning_rlhf.rollout.base import (
    ROLLOUT_ENGINES, Rollout, RolloutEngine, SamplingParams, response_mask_from_eos,
)
from lightning_rlhf.rollout.hf import HFGenerateEngine
from lightning_rlhf.rollout.keyed import keyed_uniform, row_keys
from lightning_rlhf.rollout.lean_llama import LeanLlama, unsupported_reason

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits (n, V) with tokens outside the top-k, or outside the smallest set holding top_p of the
    probability, set to -inf (0 and 1.0 disable them; at least one token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: Tensor, p: SamplingParams, ban_eos: bool, u: Tensor | None = None,
                  fused: bool = False) -> tuple[Tensor, Tensor]:
    """(n, V) logits -> (tokens (n,), their log-probs under softmax(logits / T), in float32). `ban_eos` keeps eos
    from being sampled (min_new_tokens); the log-probs are of the unfiltered distribution. `u` (n, 1) in
    (0, 1]: the uniforms to use (keyed sampling); None draws them from torch's generator. `fused`: without
    top-k/top-p, on a CPU, draw with `cpu_kernels.sample` (the same inversion in one kernel: the same tokens but
    where float rounding puts u at a boundary; bfloat16 logits are read as they are, else made float32 first).

    Sampling inverts the cumulative distribution with one uniform number per row (`torch.multinomial` draws
    one exponential number per vocabulary entry: a quarter of the decode time of a 135M model on a CPU).
    Without top-k/top-p one softmax gives both the sampling weights (eos zeroed when banned; the inversion
    needs no normalising) and the log-probs (the log of the chosen tokens' probabilities)."""
    plain = not p.greedy and p.top_k == 0 and p.top_p >= 1.0
    if plain and fused and logits.device.type == "cpu" and logits.dtype in cpu_kernels.DTYPES:
        u = 1.0 - torch.rand(logits.shape[0], 1, dtype=torch.float64) if u is None else u.to(torch.float64)
        eos = torch.as_tensor(p.eos_ids) if ban_eos else None
        drawn = cpu_kernels.sample(logits.contiguous(), p.temperature, u.contiguous(), eos)
        if drawn is not None:
            return drawn
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    scaled = logits if p.greedy or p.temperature == 1.0 else logits / p.temperature
    if plain:
        probs = scaled.softmax(dim=-1)
        if ban_eos:  # in place: a banned token is never chosen, so the chosen tokens' probabilities stay
            probs.index_fill_(-1, torch.as_tensor(p.eos_ids, device=probs.device), 0.0)
        tokens = _invert_cdf(probs, u)
        chosen = probs.gather(-1, tokens[:, None])[:, 0]
        if bool((chosen > 0).all()):  # else all mass but eos's underflowed: the general path below renormalises
            return tokens, chosen.log()
    logp_all = scaled.log_softmax(dim=-1)
    chosen = scaled.masked_fill(_eos_columns(scaled, p), float("-inf")) if ban_eos else scaled
    if p.greedy:
        tokens = chosen.argmax(dim=-1)
    else:
        tokens = _invert_cdf(filter_logits(chosen, p.top_k, p.top_p).softmax(dim=-1), u)
    return tokens, logp_all.gather(-1, tokens[:, None])[:, 0]


CDF_BLOCK = 256  # vocabulary entries per block of `_invert_cdf`'s first level
ONE_LEVEL_MAX = 2048  # vocabularies up to this size take one cumulative sum (fewer kernels: faster there)


def _invert_cdf(weights: Tensor, u: Tensor | None) -> Tensor:
    """One token per row of non-negative `weights` (n, V): the first whose cumulative weight reaches u times
    the row's total; `u` (n, 1) in (0, 1], drawn here when None (never a zero-weight token).

    Up to ONE_LEVEL_MAX entries: one float64 cumulative sum. Above, two levels: the cumulative sums of
    blocks of CDF_BLOCK entries pick a block, then the cumulative sum inside it picks the token. That is the
    token a full-length cumulative sum would pick (sums that differ by float64 rounding aside), without writing
    an (n, V) float64 array: for 64 rows of a 49k vocabulary, about 0.9 ms against 1.7 ms (15 ms when that
    25 MB array gets fresh pages from the kernel each step)."""
    n, v = weights.shape
    if u is None:
        u = 1.0 - torch.rand(n, 1, dtype=torch.float64, device=weights.device)
    if v <= ONE_LEVEL_MAX:
        cdf = weights.cumsum(dim=-1, dtype=torch.float64)
        return torch.searchsorted(cdf, u.to(torch.float64) * cdf[:, -1:])[:, 0].clamp(max=v - 1)
    full = v - v % CDF_BLOCK
    sums = weights[:, :full].reshape(n, -1, CDF_BLOCK).sum(-1, dtype=torch.float64)
    if full < v:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], dim=-1)
    block_cdf = sums.cumsum(dim=-1)
    target = u.to(torch.float64) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target).clamp(max=sums.shape[-1] - 1)  # (n, 1)
    cols = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=weights.device)  # (n, CDF_BLOCK)
    inside = weights.gather(-1, cols.clamp(max=v - 1)).masked_fill(cols >= v, 0.0)
    cdf = inside.cumsum(dim=-1, dtype=torch.float64) + (block_cdf.gather(-1, block) - sums.gather(-1, block))
    # rounding may leave the block's last sum a hair below the target: then take its last token of weight > 0
    pick = torch.searchsorted(cdf, torch.minimum(target, cdf[:, -1:]))
    return cols.gather(-1, pick.clamp(max=CDF_BLOCK - 1))[:, 0]


def _eos_columns(logits: Tensor, p: SamplingParams) -> Tensor:
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[torch.as_tensor(p.eos_ids, device=logits.device)] = True
    return banned


@ROLLOUT_ENGINES.register("static")
class StaticCacheEngine(RolloutEngine):
    """Fast sampling for Llama-family models; see the module docstring. Other models use the "hf" engine.

    Args:
        max_batch_size: rows per call (None: all); prompts are grouped by length across calls.
        dtype: sampling precision: float32, bfloat16, float16 or None (the model's own).
        compact_below: compact the cache once this share of its rows or fewer is still generating.
        cpu_kernels: decode with the fused CPU kernels (`cpu_kernels.py`: a float32 or bfloat16 model on a CPU,
            built once with the system's C compiler). None (default): where they work; false: never; true: fail if
            they cannot.
    """

    supports_keys = True

    def __init__(self, max_batch_size: int | None = None, dtype: str | None = None, compact_below: float = 0.75,
                 cpu_kernels: bool | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} (or None: the model's own)")
        self.max_batch_size, self.dtype, self.compact_below = max_batch_size, dtype, compact_below
        self.cpu_kernels = cpu_kernels
        self.fallback = HFGenerateEngine(max_batch_size=max_batch_size, dtype=dtype)
        self._warned: set[str] = set()

    def _generate(self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                  params: SamplingParams) -> Rollout:
        reason = unsupported_reason(model, prompt_ids.shape[1] + params.max_new_tokens)
        if reason is not None:
            if params.prompt_keys is not None:
                raise ValueError(f"keyed sampling (rollout.sampling_seed) needs the static engine, which cannot "
                                 f"run this model: {reason}; set rollout.sampling_seed to null")
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("static rollout engine: %s; sampling with the 'hf' engine instead", reason)
            return self.fallback._generate(model, prompt_ids, prompt_mask, params)
        with torch.no_grad():
            rows = prompt_ids.shape[0] * params.num_generations
            lean = LeanLlama.from_model(model, DTYPES[self.dtype] if self.dtype else None,
                                        rows=min(rows, self.max_batch_size or rows), fused=self.cpu_kernels)
            tokens, logprobs = self._by_length(lean, prompt_ids, prompt_mask, params)
        g, eos = params.num_generations, params.eos_ids
        real, truncated = response_mask_from_eos(tokens, eos)
        width = max(1, int(real.sum(-1).max()))  # no column that is padding in every row
        tokens, logprobs, real = tokens[:, :width], logprobs[:, :width], real[:, :width]
        return Rollout(prompt_ids=prompt_ids.repeat_interleave(g, dim=0),
                       prompt_mask=prompt_mask.long().repeat_interleave(g, dim=0),
                       response_ids=torch.where(real, tokens, params.pad_token_id), response_mask=real.float(),
                       logprobs=torch.where(real, logprobs, 0.0), truncated=truncated, group_size=g)

    def _by_length(self, lean: LeanLlama, ids: Tensor, mask: Tensor, p: SamplingParams) -> tuple[Tensor, Tensor]:
        """Sample in calls of at most max_batch_size rows, prompts sorted by length; rows back in order."""
        g = p.num_generations
        per_call = max(1, (self.max_batch_size or ids.shape[0] * g) // g)
        order = torch.argsort(mask.sum(-1), stable=True)
        tokens = torch.full((ids.shape[0] * g, p.max_new_tokens), p.pad_token_id, device=ids.device)
        logprobs = torch.zeros(tokens.shape, device=ids.device)
        for chunk in order.split(per_call):
            width = int(mask[chunk].sum(-1).max())  # drop the columns that are padding for every prompt here
            keys = None if p.prompt_keys is None else p.prompt_keys[chunk.to(p.prompt_keys.device)]
            t, lp = self._sample(lean, ids[chunk, -width:], mask[chunk, -width:], p, keys)
            rows = (chunk[:, None] * g + torch.arange(g, device=ids.device)).reshape(-1)
            tokens[rows], logprobs[rows] = t, lp
        return tokens, logprobs

    def _sample(self, lean: LeanLlama, ids: Tensor, mask: Tensor, p: SamplingParams,
                keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Prefill once per prompt, then decode G rows per prompt with compaction -> (tokens, logprobs).
        `keys` (prompts,): keyed sampling, each row's uniforms from its row key and the token position."""
        g, steps, width = p.num_generations, p.max_new_tokens, ids.shape[1]
        logits, kvs = lean.prefill(ids, mask)
        cache = lean.new_cache(kvs, mask, g, steps)
        n = ids.shape[0] * g
        tokens = torch.full((n, steps), p.pad_token_id, dtype=torch.long, device=ids.device)
        logprobs = torch.zeros(n, steps, device=ids.device)
        rows = torch.arange(n, device=ids.device)  # which output row each cache row is
        position = mask.sum(-1).repeat_interleave(g)  # the next token's position, per cache row
        eos = torch.as_tensor(p.eos_ids, device=ids.device)
        rkeys = None if keys is None or p.greedy else row_keys(keys.to(ids.device), g)
        u = None if rkeys is None else keyed_uniform(rkeys, 0)
        nxt, lp = sample_tokens(logits.repeat_interleave(g, dim=0), p, ban_eos=p.min_new_tokens > 0, u=u,
                                fused=lean.fused)
        done, finished, compacted = torch.zeros(n, dtype=torch.bool, device=ids.device), 0, False
        for t in range(steps):
            if finished:  # rows finished but not yet compacted away
                nxt, lp = torch.where(done, p.pad_token_id, nxt), torch.where(done, 0.0, lp)
            if compacted:
                tokens[rows, t], logprobs[rows, t] = nxt, lp
            else:  # every row still in place: plain column copies
                tokens[:, t], logprobs[:, t] = nxt, lp
            done = done | torch.isin(nxt, eos)
            finished = int(done.sum())  # the loop's one read of the rows' state per token
            if t == steps - 1 or finished == len(done):
                break
            if finished >= (1.0 - self.compact_below) * len(done):
                keep = (~done).nonzero()[:, 0]
                cache.keep(keep)
                rows, position, nxt, done = rows[keep], position[keep], nxt[keep], done[keep]
                finished, compacted = 0, True
            logits = lean.decode(nxt, position, cache, width + t)
            position = position + 1
            u = None if rkeys is None else keyed_uniform(rkeys[rows], t + 1)
            nxt, lp = sample_tokens(logits, p, ban_eos=t + 1 < p.min_new_tokens, u=u, fused=lean.fused)
        return tokens, logprobs
