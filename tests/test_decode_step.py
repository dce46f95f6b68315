"""The one-call decode step of small float32 models (`rollout/decode_step.c` through `rollout/decode_step.py`):
the same logits and cache writes as the per-operation fused kernels and the eager decode, at shapes that leave
partial GEMM tiles (rows not a multiple of the tile's, vocabulary and projection widths not a multiple of its
columns), with biases, grouped-query heads, padded prompts and compaction; and taken only where it pays."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_rlhf.rollout import cpu_kernels as K
from lightning_rlhf.rollout import decode_step
from lightning_rlhf.rollout.lean_llama import LeanLlama

needs_kernels = pytest.mark.skipif(K.kernels() is None, reason="no C compiler: the fused kernels cannot be built")


def qwen2(seed: int) -> Qwen2ForCausalLM:
    """q/k/v biases (made non-zero), 6 query heads on 2 key/value heads, widths that leave partial tiles: vocabulary
    301, hidden 96, intermediate 200, stacked q/k/v 96 + 2 * 32."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


def llama(seed: int, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, **kw)
    return LlamaForCausalLM(cfg).eval()


def sides(model, monkeypatch) -> tuple[LeanLlama, LeanLlama, LeanLlama]:
    """Eager, per-operation fused, and one-call versions of the same model's sampler."""
    eager = LeanLlama.from_model(model, rows=7, fused=False)
    with monkeypatch.context() as m:
        m.setattr(decode_step, "SMALL_STEP_BYTES", 0)
        ops = LeanLlama.from_model(model, rows=7, fused=True)
    step = LeanLlama.from_model(model, rows=7, fused=True)
    assert eager.step is None and ops.step is None and step.step is not None
    return eager, ops, step


@needs_kernels
@pytest.mark.parametrize("make", [qwen2, lambda seed: llama(seed, mlp_bias=True, attention_bias=True)])
def test_the_one_call_step_gives_the_per_operation_and_eager_logits(make, monkeypatch):
    model = make(3)
    versions = sides(model, monkeypatch)
    ids = torch.randint(3, 256, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a padded prompt: the cache's -inf bias
    with torch.no_grad():
        _, kvs = versions[0].prefill(ids, mask)
        caches = [v.new_cache(kvs, mask, 3, 9) for v in versions]  # 9 rows, 3 per prompt
        tokens, positions = torch.randint(3, 256, (9,)), mask.sum(-1).repeat_interleave(3)
        for t in range(6):
            if t == 2:  # rows 1, 4 and 8 finished: 7 rows left, one full tile of 6 and a partial one of 1
                keep = torch.tensor([0, 2, 3, 5, 6, 7, 8])
                for cache in caches:
                    cache.keep(keep)
                tokens, positions = tokens[keep], positions[keep]
            eager, ops, one = (v.decode(tokens, positions + t, c, 6 + t) for v, c in zip(versions, caches))
            assert one.dtype == torch.float32 and one.shape == (len(tokens), model.config.vocab_size)
            assert (one - eager).abs().max() < 1e-5 and (one - ops).abs().max() < 1e-5, t
            tokens = one.argmax(-1)
        for ops_kv, one_kv in zip(caches[1].kv, caches[2].kv):  # the same keys and values written, columns 0-5
            for a, b in zip((K.plain_keys(ops_kv[0]), ops_kv[1]), (K.plain_keys(one_kv[0]), one_kv[1])):
                assert (a[:, :, :6] - b[:, :, :6]).abs().max() < 1e-5


@needs_kernels
def test_the_step_is_taken_only_for_small_float32_models(monkeypatch):
    model = llama(0)
    assert LeanLlama.from_model(model).step is not None
    assert LeanLlama.from_model(model, torch.bfloat16).step is None  # bfloat16: the per-operation kernels
    assert LeanLlama.from_model(model, fused=False).step is None
    # decoder + lm-head weights: 2 layers x (4 x 64 x 64 + 3 x 64 x 128 + 2 x 64 norm) + 256 x 64 = 98560 floats,
    # 394240 bytes
    monkeypatch.setattr(decode_step, "SMALL_STEP_BYTES", 394240)
    assert LeanLlama.from_model(model).step is not None
    monkeypatch.setattr(decode_step, "SMALL_STEP_BYTES", 394239)
    assert LeanLlama.from_model(model).step is None


@needs_kernels
def test_a_column_outside_the_cache_is_refused():
    model = llama(1)
    lean = LeanLlama.from_model(model, rows=2)
    ids, mask = torch.randint(3, 256, (1, 4)), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        _, kvs = lean.prefill(ids, mask)
        cache = lean.new_cache(kvs, mask, 2, 8)  # room for 8 new columns, rounded up to a block of 32
        with pytest.raises(ValueError, match="outside the cache"):
            lean.decode(torch.tensor([5, 6]), torch.tensor([4, 4]), cache, 4 + 32)
