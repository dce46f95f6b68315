"""Many tokens per row in one call of the step kernel (`decode_step.c` with `steps` > 1): the prompt prefill of a
small float32 model (`LeanLlama.prefill`) and the no-grad teacher-forced pass (`rollout/lean_scoring.py`) give the
logits, keys and values of the module path, with left-padded prompts, grouped-query heads, biases, shared and
unshared prompts and padded responses; and the pass is taken only where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_rlhf.rollout import Rollout, lean_scoring, sequence_logprobs
from lightning_rlhf.rollout import cpu_kernels as K
from lightning_rlhf.rollout import decode_step
from lightning_rlhf.rollout.lean_llama import CacheLayout, LeanLlama
from lightning_rlhf.rollout.teacher_forcing import _plain_or_shared_logits

needs_kernels = pytest.mark.skipif(K.kernels() is None, reason="no C compiler: the fused kernels cannot be built")


def qwen2() -> Qwen2ForCausalLM:
    """q/k/v biases (non-zero), 6 query heads on 2 key/value heads, vocabulary 301: partial GEMM tiles."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
            layer.self_attn.k_proj.bias.normal_()
    return model


def llama() -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


def padded_prompts(rows: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 250, (rows, p))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # some left padding
    mask[2, : p - 1] = 0  # a prompt of one real token
    return ids.masked_fill(mask == 0, 0), mask


@needs_kernels
@pytest.mark.parametrize("make", [qwen2, llama])
def test_the_prefill_through_the_step_gives_the_module_prefill(make, monkeypatch):
    model = make()
    lean = LeanLlama.from_model(model)
    with monkeypatch.context() as m:
        m.setattr(decode_step, "SMALL_STEP_BYTES", 0)
        ops = LeanLlama.from_model(model)  # the per-operation prefill
    assert lean.step is not None and ops.step is None
    ids, mask = padded_prompts(4, 7)
    with torch.no_grad():
        logits, kvs = lean.prefill(ids, mask)
        want_logits, want_kvs = ops.prefill(ids, mask)
    assert isinstance(kvs, CacheLayout) and not isinstance(want_kvs, CacheLayout)
    assert (logits - want_logits).abs().max() < 1e-5
    real = mask.bool()[:, None, :, None]  # padding positions' keys and values are never attended
    for (k, v), (want_k, want_v) in zip(kvs, want_kvs):
        assert ((K.plain_keys(k)[:, :, :7] - want_k).abs() * real).max() < 1e-5
        assert ((K.plain_values(v)[:, :, :7] - want_v).abs() * real).max() < 1e-5


def rollout(g: int, same_prompts: bool = True) -> Rollout:
    """3 prompts x g samples, prompts left-padded, two responses cut short by an eos (padding after it)."""
    ids, mask = padded_prompts(3, 6)
    ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    if not same_prompts:
        ids[1, -1] = 7  # the first group's rows no longer share their prompt
    n, t = ids.shape[0], 5
    response_mask = torch.ones(n, t)
    response_mask[0, 3:] = 0
    response_mask[n - 1, 1:] = 0
    response = torch.randint(3, 250, (n, t)).masked_fill(response_mask == 0, 0)
    return Rollout(prompt_ids=ids, prompt_mask=mask, response_ids=response, response_mask=response_mask,
                   logprobs=torch.zeros(n, t), truncated=torch.zeros(n, dtype=torch.bool), group_size=g)


@needs_kernels
@pytest.mark.parametrize("make", [qwen2, llama])
@pytest.mark.parametrize("g, same", [(3, True), (3, False), (1, True)])
def test_the_one_call_teacher_forced_pass_gives_the_module_logits(make, g, same):
    model, ro = make(), rollout(g, same)
    with torch.no_grad():
        fast = lean_scoring.response_logits(model, ro)
        want = _plain_or_shared_logits(model, ro)
    assert fast is not None and fast.shape == want.shape
    real = ro.response_mask.bool()[..., None]
    assert ((fast - want).abs() * real).max() < 1e-4
    with torch.no_grad():
        logprobs = sequence_logprobs(model, ro, temperature=0.7)
    want_logprobs = torch.log_softmax(want / 0.7, -1).gather(-1, ro.response_ids[..., None])[..., 0]
    assert (logprobs - want_logprobs * ro.response_mask).abs().max() < 1e-4


@needs_kernels
def test_the_one_call_pass_is_taken_only_without_grad_for_small_float32_models():
    model, ro = llama(), rollout(2)
    assert lean_scoring.response_logits(model, ro) is None  # gradients on: the module path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean_scoring.response_logits(model, ro) is None  # the module path computes in bfloat16 there
    with torch.no_grad():
        assert lean_scoring.response_logits(model.to(torch.bfloat16), ro) is None
        model.float()
        assert lean_scoring.response_logits(model, ro) is not None
        model.train()
        model.config.attention_dropout = 0.1
        assert lean_scoring.response_logits(model, ro) is None  # dropout would change the numbers


@needs_kernels
def test_the_copied_weights_follow_an_update_of_the_parameters():
    model, ro = llama(), rollout(2)
    with torch.no_grad():
        before = lean_scoring.response_logits(model, ro)
        model.lm_head.weight.mul_(1.5)  # in place, as an optimizer step: the version counter moves
        after = lean_scoring.response_logits(model, ro)
        want = _plain_or_shared_logits(model, ro)
    real = ro.response_mask.bool()[..., None]
    assert ((after - before).abs() * real).max() > 1e-2
    assert ((after - want).abs() * real).max() < 1e-4


@needs_kernels
def test_bad_arguments_to_a_many_token_call_are_refused():
    lean = LeanLlama.from_model(llama())
    ids, mask = padded_prompts(3, 4)
    with torch.no_grad():
        _, kvs = lean.prefill(ids, mask)
        cache = lean.new_cache(kvs, mask, 1, 4)
        cos, sin = lean._rope_rows(torch.arange(12) % 4 + 4)
        with pytest.raises(ValueError, match="masked must be int64"):
            lean.step(torch.randint(3, 250, (12,)), cos, sin, cache, 4, steps=4, masked=torch.zeros(3))
        with pytest.raises(ValueError, match="11 tokens for 3 cache rows x 4 steps"):
            lean.step(torch.randint(3, 250, (11,)), cos[:11], sin[:11], cache, 4, steps=4)
