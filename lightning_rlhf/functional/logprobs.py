"""Per-token log-probabilities and entropies from logits, in float32.

`logprobs_from_logits` gives log pi(a_t | s_t) of the sampled tokens; `entropy_from_logits` gives the
full-distribution entropy -sum_v p_v log p_v of each position (docs/math.md, "Log-probabilities and entropy").

Alignment is the caller's job: pass the logits *at the position before* each token (for a causal LM,
`logits[:, prompt_len - 1 : -1]` against the response tokens), so that logits[b, t] predicts tokens[b, t].

Stability: each row's max logit is subtracted first (exactly, in float32), so huge logits neither
overflow nor cancel.

Memory: the (B, T, V) logits are processed in chunks of rows, each upcast to float32 on its own, so a
bf16 forward never holds a full float32 copy of the logits at once. Log-probs use the form
`logit[token] - logsumexp(logits)`, which is log_softmax-then-gather without materialising log_softmax.
Under autograd the per-chunk float32 tensors are still saved for backward (a custom backward could avoid
that; we keep it simple).

Simplifications: the slides write the entropy bonus as -E[log pi(a_t | s_t)] (a one-sample estimate
from the sampled token); we compute the exact entropy over the vocabulary instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of float32 logits processed at once (2**25 floats = 128 MiB per chunk).
_CHUNK_ELEMENTS = 2**25


def _row_chunks(flat: Tensor) -> list[tuple[int, int]]:
    """Split the rows of a (N, V) tensor into [start, stop) ranges of about _CHUNK_ELEMENTS each."""
    n, v = flat.shape
    step = max(1, _CHUNK_ELEMENTS // max(v, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _float32_shifted(x: Tensor) -> Tensor:
    """Upcast to float32 (float64 stays) and subtract the row max (detached; softmax is shift-invariant).

    With the max at 0, `logsumexp - sum p z` does not cancel catastrophically for large logits.
    A row that is all -inf is left as is.
    """
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    top = x.detach().amax(dim=-1, keepdim=True)
    return x - torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-softmax of `logits` gathered at `tokens`: logp[b, t] = log softmax(logits[b, t])[tokens[b, t]].

    Shapes: logits (B, T, V) (any dtype), tokens (B, T) integer -> (B, T) float32 (float64 stays
    float64). Computed as `logits[token] - logsumexp(logits)` in float32, chunk by chunk.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not match tokens shape {tuple(tokens.shape)}: "
            "expected logits (B, T, V) and tokens (B, T); slice the logits to the positions that "
            "predict the tokens (logits[:, start - 1 : -1] for tokens[:, start:])"
        )
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_tokens = tokens.reshape(-1, 1).long()
    out = []
    for start, stop in _row_chunks(flat):
        rows = _float32_shifted(flat[start:stop])
        picked = rows.gather(-1, flat_tokens[start:stop]).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if not out:  # no positions at all
        return torch.zeros(tokens.shape, dtype=dtype, device=logits.device)
    return torch.cat(out).reshape(tokens.shape)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at each position: H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v.

    Shapes: logits (B, T, V) -> (B, T) float32 (float64 stays float64). The logsumexp form is stable
    for large logits; logits of -inf (masked vocabulary entries) contribute 0, as p log p -> 0.
    """
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, vocab)
    out = []
    for start, stop in _row_chunks(flat):
        rows = _float32_shifted(flat[start:stop])
        lse = torch.logsumexp(rows, dim=-1)
        p = torch.softmax(rows, dim=-1)
        # p_v = 0 where z_v = -inf; replace z_v by 0 there so 0 * -inf does not become NaN.
        finite = rows.masked_fill(torch.isneginf(rows), 0.0)
        out.append(lse - (p * finite).sum(-1))
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if not out:
        return torch.zeros(lead, dtype=dtype, device=logits.device)
    return torch.cat(out).reshape(lead)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token] per row, chunked, saving only the raw logits and the logsumexp.

    Forward and gradient are the same float operations as `logprobs_from_logits(logits.float() / T)`
    under autograd (so the results are bit-identical), without keeping float32 copies of the (M, V) logits
    alive for the backward pass: the softmax is recomputed there, one chunk of rows at a time.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, with_entropy: bool):  # type: ignore[override]
        logp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse, entropy = torch.empty_like(logp), torch.empty_like(logp) if with_entropy else None
        for start, stop in _row_chunks(logits):
            rows = _float32_shifted(_scaled(logits[start:stop], temperature))
            lse[start:stop] = torch.logsumexp(rows, dim=-1)
            logp[start:stop] = rows.gather(-1, tokens[start:stop, None])[:, 0] - lse[start:stop]
            if with_entropy:
                finite = rows.masked_fill(torch.isneginf(rows), 0.0)
                entropy[start:stop] = lse[start:stop] - (torch.softmax(rows, dim=-1) * finite).sum(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_entropy: Tensor | None):  # type: ignore[override]
        logits, tokens, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start, stop in _row_chunks(logits):
            rows = _float32_shifted(_scaled(logits[start:stop], ctx.temperature))
            g = grad[start:stop, None]
            d = (rows - lse[start:stop, None]).exp() * -g  # d/d rows of -logsumexp
            d.scatter_add_(-1, tokens[start:stop, None], g)  # + d/d rows of the picked logit
            out[start:stop] = (d / ctx.temperature if ctx.temperature != 1.0 else d).to(logits.dtype)
        return out, None, None, None


def _scaled(rows: Tensor, temperature: float) -> Tensor:
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return rows / temperature if temperature != 1.0 else rows


def logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `tokens` under softmax(logits / temperature), and the (detached) entropy, in one pass.

    Shapes: logits (B, T, V) any float dtype, tokens (B, T) -> (logp (B, T) float32, differentiable;
    entropy (B, T) float32 without gradient, or None). The same numbers as `logprobs_from_logits` and
    `entropy_from_logits` on `logits.float() / temperature`, but no float32 copy of the logits is made or
    kept for backward beyond one chunk of rows (the teacher-forced pass of a 49k-vocabulary model saves
    hundreds of MB per step), and the logsumexp is shared by both outputs.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match tokens shape {tuple(tokens.shape)}")
    if logits.dtype == torch.float64:  # keep float64 exact, through autograd
        scaled = logits / temperature
        ent = entropy_from_logits(scaled.detach()) if with_entropy else None
        return logprobs_from_logits(scaled, tokens), ent
    vocab = logits.shape[-1]
    logp, ent = _TokenLogprobs.apply(logits.reshape(-1, vocab), tokens.reshape(-1).long(), float(temperature),
                                     with_entropy)
    return logp.reshape(tokens.shape), None if ent is None else ent.reshape(tokens.shape)
