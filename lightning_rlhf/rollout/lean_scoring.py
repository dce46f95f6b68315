"""Teacher-forced logits of a small float32 model without autograd, through the one-call step of `decode_step.c`.

The reference model's pass (and a recomputation of old log-probs) needs no gradient, so it need not go through
the model's modules op by op. For a model that decodes through `DecodeStep` (`decode_step.pays`: float32, on a
CPU, at most SMALL_STEP_BYTES of weights), `response_logits` runs `LeanLlama`'s prefill over each distinct
prompt but its last token, then every row's last prompt token and its response but the last token as one call
of the step kernel with `steps` = T, each position attending to its prompt and the positions before it. On 2
cores of an AMD EPYC (Zen 4), a 1M-parameter Llama's reference pass over 32 rows x (15 + 32) tokens took 25
against 37-44 ms through the HF modules (same process, alternating; log-probs within 1e-6).

The weights are copied (transposed and stacked) once per model and kept while its parameters are unchanged:
the copy is keyed on each parameter's storage and version counter, so an optimizer step or a reload makes a
fresh one. A PEFT model is not cached (adapters can be switched off and on without changing a version).

Simplified: the model is run as `LeanLlama` runs it (no dropout: a model in training mode with attention
dropout takes the module path); rows of a group must share their prompt token for token (else each row's
prompt is run on its own).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from lightning_rlhf.models.lora import is_peft, unwrap_peft
from lightning_rlhf.rollout import decode_step
from lightning_rlhf.rollout.base import Rollout
from lightning_rlhf.rollout.lean_llama import LeanLlama, unsupported_reason

_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (parameter key, LeanLlama)


def _weight_bytes(model: torch.nn.Module) -> int:
    decoder, head = model.model.layers, model.get_output_embeddings()
    return 4 * (sum(p.numel() for p in decoder.parameters()) + head.weight.numel())


def _lean(model: torch.nn.Module) -> LeanLlama | None:
    """The model's `LeanLlama` with its one-call step, made once per state of its parameters; None where the step
    does not apply."""
    inner = unwrap_peft(model)
    config = getattr(inner, "config", None)
    param = next(inner.parameters(), None)
    if (param is None or param.dtype != torch.float32 or param.device.type != "cpu"
            or (inner.training and getattr(config, "attention_dropout", 0.0))
            or unsupported_reason(inner, 0) is not None
            or not decode_step.pays(_weight_bytes(inner), torch.float32, param.device)):
        return None
    if is_peft(model):
        lean = LeanLlama.from_model(model, torch.float32)
        return lean if lean.step is not None else None
    key = tuple((p.data_ptr(), p._version) for p in inner.parameters())
    built = _BUILT.get(inner)
    if built is None or built[0] != key:
        built = (key, LeanLlama.from_model(inner, torch.float32))
        _BUILT[inner] = built
    return built[1] if built[1].step is not None else None


def response_logits(model: torch.nn.Module, ro: Rollout) -> Tensor | None:
    """(N, T, V) float32 logits at positions P-1 .. P+T-2 (those that predict the T response tokens), as
    `teacher_forcing._response_logits` gives them, through the one-call step; None where it does not apply
    (gradients on, autocast on, another dtype or device, a larger model, P < 2 or T < 1)."""
    n, p = ro.prompt_ids.shape
    t = ro.response_ids.shape[1]
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or p < 2 or t < 1 or n == 0:
        return None  # under autocast the module path computes in the autocast dtype, as the training pass does
    lean = _lean(model)
    if lean is None:
        return None
    g = ro.group_size
    keys = torch.cat([ro.prompt_ids, ro.prompt_mask.long()], dim=1)
    if g < 2 or n % g or not torch.equal(keys.view(-1, g, keys.shape[1]), keys[::g, None].expand(-1, g, -1)):
        g = 1
    ids, mask = ro.prompt_ids[::g, : p - 1], ro.prompt_mask[::g, : p - 1].long()
    _, kvs = lean.prefill(ids, mask)
    cache = lean.new_cache(kvs, mask, g, t)
    tokens = torch.cat([ro.prompt_ids[:, -1:], ro.response_ids[:, :-1]], dim=1).reshape(-1).contiguous()
    positions = ro.position_ids[:, p - 1 : p + t - 1].reshape(-1).contiguous()
    return lean.run_step(tokens, positions, cache, p - 1, steps=t).view(n, t, -1)
