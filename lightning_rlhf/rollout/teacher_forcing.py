"""Teacher-forced log-probs of a rollout's responses: one forward pass over prompt + response.

This is how trainers score the policy (with gradients) and the reference model (under no_grad) on the
tokens an engine sampled. With the same temperature, `sequence_logprobs` reproduces the engine's
sampling-time logprobs (the parity test in tests/test_rollout.py pins that down).

A PEFT (LoRA) model is run as its base model, which applies the adapters (and honours `disable_adapter()`).

Simplifications: the whole batch goes through one forward (split the Rollout for smaller memory);
the train/eval mode and grad mode are the caller's (dropout in train mode changes the numbers).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import cache_utils

from lightning_rlhf.functional import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from lightning_rlhf.models.lora import unwrap_peft
from lightning_rlhf.rollout import lean_scoring, train_ops
from lightning_rlhf.rollout.base import Rollout


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in _forward_params(model)


def _checkpointing(model: torch.nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers 5; older: is_gradient_checkpointing
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _shared_prompt_logits(model: torch.nn.Module, ro: Rollout) -> Tensor | None:
    """The logits of `_response_logits`, with each distinct prompt run through the model once.

    Rows that sample from the same prompt (GRPO's groups) share its keys and values: one pass of the decoder
    (no lm head) over the distinct prompts but their last token, with a cache; the cache rows copied to the rows
    that use them (differentiably, so the gradient reaches the prompt positions from every row); then one forward
    over each row's last prompt token and its response, whose T logits are the ones wanted. So the lm head runs
    once, over the N x T positions. None when every prompt is distinct, some prompt has fewer than 2 tokens, the
    model cannot take a cache (gradient checkpointing) or has no `get_decoder()`, or T < 2.
    """
    t, p = ro.response_ids.shape[1], ro.prompt_ids.shape[1]
    params = _forward_params(model)
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if (t < 2 or p < 2 or decoder is None or "logits_to_keep" not in params or cache_arg not in params
            or _checkpointing(model)):
        return None
    keys = torch.cat([ro.prompt_ids, ro.prompt_mask.long()], dim=1)
    g = ro.group_size
    if g > 1 and len(ro) % g == 0 and torch.equal(keys.view(-1, g, keys.shape[1]), keys[::g, None].expand(-1, g, -1)):
        distinct, inverse = keys[::g], None  # each group of g consecutive rows shares its prompt (GRPO's rollouts)
    else:
        distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
        if distinct.shape[0] == len(ro):
            return None
    if bool((distinct[:, p:-1].sum(1) == 0).any()):
        return None
    ids, mask = distinct[:, : p - 1], distinct[:, p : 2 * p - 1]
    head = decoder(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
    cache = head[cache_arg] if cache_arg in head else head.past_key_values
    _spread_cache(cache, len(distinct), g) if inverse is None else cache.reorder_cache(inverse)
    inputs = torch.cat([ro.prompt_ids[:, -1:], ro.response_ids[:, :-1]], dim=1)
    rest = model(input_ids=inputs, attention_mask=ro.attention_mask[:, : p + t - 1],
                 position_ids=ro.position_ids[:, p - 1 : p + t - 1], use_cache=True, logits_to_keep=t,
                 **{cache_arg: cache})
    return rest.logits


def _spread_cache(cache, rows: int, g: int) -> None:
    """Each of the cache's `rows` rows repeated for g consecutive rows. Where the layers hold plain `keys` /
    `values` tensors (HF's DynamicLayer) this is a broadcast copy, whose gradient is a sum over each group;
    beam-search reordering's `index_select` (the fallback) costs a scatter-add in the backward instead."""
    layers, plain = getattr(cache, "layers", None), getattr(cache_utils, "DynamicLayer", None)
    if not layers or plain is None or any(type(layer) is not plain for layer in layers):
        cache.reorder_cache(torch.arange(rows).repeat_interleave(g))
        return
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            setattr(layer, name, t[:, None].expand(-1, g, *t.shape[1:]).reshape(-1, *t.shape[1:]))


def _tied_embedding(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The input embedding when it shares its weight with the lm head, is trained, and is a plain parameter
    (not sharded by FSDP or DeepSpeed, whose flat parameters take dense gradients only); else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if not isinstance(emb, torch.nn.Embedding) or head is None or head.weight is not emb.weight:
        return None
    w = emb.weight
    plain = type(w) is torch.nn.Parameter and not hasattr(w, "ds_id") and not getattr(w, "_fsdp_flattened", False)
    return emb if plain and w.requires_grad and torch.is_grad_enabled() else None


@contextmanager
def _sparse_tied_lookup(model: torch.nn.Module) -> Iterator[None]:
    """During a forward with gradients, a tied input embedding's lookup gives a sparse gradient (the rows it
    read) instead of a dense (V, D) one, which autograd adds into the lm head's dense gradient of the same
    weight: the same sum, without writing a zero-filled vocabulary-sized matrix per backward (a 135M model's
    embedding is 113 MB in fp32)."""
    emb = _tied_embedding(model)
    if emb is None or emb.sparse:
        yield
        return
    emb.sparse = True
    try:
        yield
    finally:
        emb.sparse = False


def _response_logits(model: torch.nn.Module, rollout: Rollout) -> Tensor:
    """(N, T, V) raw logits at positions P-1 .. P+T-2, the ones that predict the T response tokens. A PEFT
    (LoRA) model runs as its base model (adapters applied), whose forward takes logits_to_keep and a cache.
    Without gradients, a small float32 model on a CPU runs through the one-call step kernel (`lean_scoring`)."""
    lean = lean_scoring.response_logits(model, rollout)
    if lean is not None:
        return lean
    model = unwrap_peft(model)
    with _sparse_tied_lookup(model):
        return _plain_or_shared_logits(model, rollout)


def _plain_or_shared_logits(model: torch.nn.Module, rollout: Rollout) -> Tensor:
    """`_response_logits` of an unwrapped model: the shared-prompt forward where it applies, else one forward."""
    shared = _shared_prompt_logits(model, rollout)
    if shared is not None:
        return shared
    t = rollout.response_ids.shape[1]
    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = t + 1  # positions P-1 .. P+T-1 of the P+T inputs
    out = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=rollout.position_ids,
        use_cache=False,
        **kwargs,
    )
    logits = out.logits if hasattr(out, "logits") else out[0]
    # The last T+1 positions are P-1 .. P+T-1 in both cases; drop P+T-1 (it predicts past the end).
    logits = logits[:, -(t + 1) : -1] if t > 0 else logits[:, :0]
    if logits.shape[1] != t:
        raise ValueError(
            f"model returned logits for {logits.shape[1]} response positions, expected {t}: the model's "
            f"forward must return logits (N, P+T, V) or (N, T+1, V) with logits_to_keep"
        )
    return logits


def sequence_logprobs(
    model: torch.nn.Module,
    rollout: Rollout,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    return_logits: bool = False,
    entropy_grad: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Log-probs (N, T) float32 of rollout.response_ids under `model`, from logits / temperature.

    One forward on rollout.input_ids with its attention_mask and position_ids (left padding aware); the
    logits at positions P-1 .. P+T-2 predict the T response tokens. Padding positions are 0.
    With return_entropy / return_logits, returns `(logprobs, extras)` where extras["entropy"] is the
    (N, T) entropy of softmax(logits / temperature) (0 at padding; detached, a statistic, unless
    `entropy_grad=True`, which keeps its graph for an entropy bonus in the loss) and extras["logits"] the (N, T, V)
    temperature-scaled logits. Models whose forward accepts `logits_to_keep` (HF causal LMs) only
    compute the T + 1 last positions of the lm head.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use 1.0 for greedy rollouts)")
    mask = rollout.response_mask > 0
    raw = _response_logits(model, rollout)
    if not (entropy_grad or return_logits):  # the lean path: no float32 copy of the logits is kept
        fused = train_ops.token_logprobs(raw, rollout.response_ids, temperature, with_entropy=return_entropy)
        logprobs, entropy = fused or logprobs_and_entropy(raw, rollout.response_ids, temperature,
                                                          with_entropy=return_entropy)
        logprobs = torch.where(mask, logprobs, 0.0)
        if not return_entropy:
            return logprobs
        return logprobs, {"entropy": torch.where(mask, entropy, 0.0)}
    logits = raw.float() / temperature
    logprobs = torch.where(mask, logprobs_from_logits(logits, rollout.response_ids), 0.0)
    extras: dict[str, Tensor] = {}
    if return_entropy and entropy_grad:  # PPO's entropy bonus: differentiable
        extras["entropy"] = torch.where(mask, entropy_from_logits(logits), 0.0)
    elif return_entropy:
        with torch.no_grad():  # a statistic: no graph kept for it
            extras["entropy"] = torch.where(mask, entropy_from_logits(logits.detach()), 0.0)
    if return_logits:
        extras["logits"] = logits
    return logprobs, extras
