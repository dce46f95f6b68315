"""The fused CPU decode kernels (`rollout/decode_kernels.c` through `rollout/cpu_kernels.py`): each against its
formula worked by hand and against the eager torch ops it replaces, the engine's fused decode against the eager
one, and what happens without a compiler."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from lightning_rlhf.rollout import cpu_kernels as K
from lightning_rlhf.rollout import decode_step
from lightning_rlhf.rollout.lean_llama import LeanLlama, SharedPromptKVCache, StaticKVCache

needs_kernels = pytest.mark.skipif(K.kernels() is None, reason="no C compiler: the fused kernels cannot be built")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """kernels() decided again, building into an empty directory; the cached answer restored afterwards."""
    monkeypatch.setenv(K.DIR_ENV, str(tmp_path))
    K.kernels.cache_clear()
    yield tmp_path
    K.kernels.cache_clear()


@needs_kernels
def test_add_rms_norm_by_hand():
    # x = [3, 4] + y = [1, -2] = [4, 2]; mean of squares (16 + 4) / 2 = 10; eps 0:
    # out = w * x / sqrt(10) = [1 * 4, 0.5 * 2] / 3.16228 = [1.26491, 0.31623]; x keeps the sum
    x, y, w = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, -2.0]]), torch.tensor([1.0, 0.5])
    out = K.add_rms_norm(x, y, w, eps=0.0)
    assert torch.allclose(out, torch.tensor([[1.26491, 0.31623]]), atol=1e-5)
    assert x.tolist() == [[4.0, 2.0]]
    # without y: x alone, unchanged; eps under the root: [4, 2] / sqrt(10 + 6) = [1, 0.5] (w = 1)
    out = K.add_rms_norm(x, None, torch.ones(2), eps=6.0)
    assert torch.allclose(out, torch.tensor([[1.0, 0.5]])) and x.tolist() == [[4.0, 2.0]]


@needs_kernels
@pytest.mark.parametrize("d", [13, 64, 576])  # 13: a tail past the 8-wide blocks
def test_add_rms_norm_matches_the_eager_ops(d):
    torch.manual_seed(0)
    x, y, w = torch.randn(5, d), torch.randn(5, d), torch.randn(d)
    want = w * F.rms_norm(x + y, (d,), eps=1e-5)
    got = K.add_rms_norm(x, y, w, 1e-5)
    assert (got - want).abs().max() < 1e-5


@needs_kernels
def test_silu_mul_by_hand_and_on_the_halves_of_a_stacked_output():
    # silu(g) = g / (1 + e^-g): silu(0) = 0, silu(1) = 1 / 1.367879 = 0.731059, silu(-1) = -1 / 3.718282 =
    # -0.268941; times u = [2, 3, 4] -> [0, 2.193176, -1.075765]
    got = K.silu_mul(torch.tensor([[0.0, 1.0, -1.0]]), torch.tensor([[2.0, 3.0, 4.0]]))
    assert torch.allclose(got, torch.tensor([[0.0, 2.193176, -1.075765]]), atol=1e-6)
    # far out: silu(-100) and silu(-1000) are 0 to float32 (-3.7e-42, the exp clamped at exp(88): -6e-37), silu(100)
    # is 100, silu(1000) is 1000; times u = 1
    far = K.silu_mul(torch.tensor([[-100.0, -1000.0, 100.0, 1000.0] * 3]), torch.ones(1, 12))
    assert torch.allclose(far, torch.tensor([[0.0, 0.0, 100.0, 1000.0] * 3]), atol=1e-30)
    torch.manual_seed(1)
    stacked = torch.randn(6, 2 * 21) * 4  # 21: a tail; the halves are views with rows 42 floats apart
    gate, up = stacked.split(21, dim=-1)
    assert (K.silu_mul(gate, up) - F.silu(gate) * up).abs().max() < 1e-5


def test_cache_keys_hold_each_block_of_32_columns_transposed():
    # keys (P = 3 columns, hd = 2): column c = [10c, 10c + 1]. Cached: (1 block, hd 2, 32), entry [e, c] = key e
    # of column c, 0 past the third column; plain_keys gives the columns back, padded to 32
    keys = torch.tensor([[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]])
    cached = K.cache_keys(keys)
    assert cached.shape == (1, 2, 32)
    assert cached[0, :, :3].tolist() == [[0.0, 10.0, 20.0], [1.0, 11.0, 21.0]] and cached[0, :, 3:].abs().sum() == 0
    assert torch.equal(K.plain_keys(cached)[:3], keys)
    assert K.cache_keys(torch.zeros(4, 0, 2), 33).shape == (4, 2, 2, 32)  # room for 33 columns: two blocks
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert K.cache_values(values).shape == (32, 2) and torch.equal(K.plain_values(K.cache_values(values))[:3], values)


@needs_kernels
@pytest.mark.skipif(not K.pairs_layout(), reason="this CPU has no bfloat16 dot products (AVX512_BF16)")
def test_bf16_caches_hold_pairs_for_the_dot_products():
    # keys (P = 3, hd = 4): column c = [10c, 10c + 1, 10c + 2, 10c + 3]. Pairs: (1 block, hd / 2, 32, 2), entry
    # [i, c] = keys 2i and 2i + 1 of column c: [0, 1] = (10, 11), [1, 2] = (22, 23)
    keys = (torch.arange(3)[:, None] * 10 + torch.arange(4)).to(torch.bfloat16)
    cached = K.cache_keys(keys)
    assert cached.shape == (1, 2, 32, 2)
    assert cached[0, 0, 1].tolist() == [10.0, 11.0] and cached[0, 1, 2].tolist() == [22.0, 23.0]
    # values (P = 3, hd = 2): column c = [c + 1, c + 11]. Pairs: (16, hd, 2), entry [j, e] = value e of columns 2j
    # and 2j + 1: [0, 1] = (11, 12), [1, 0] = (3, 0): the fourth column is padding, 0
    values = torch.tensor([[1.0, 11.0], [2.0, 12.0], [3.0, 13.0]], dtype=torch.bfloat16)
    cv = K.cache_values(values)
    assert cv.shape == (16, 2, 2) and cv[0, 1].tolist() == [11.0, 12.0] and cv[1, 0].tolist() == [3.0, 0.0]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 16).to(torch.bfloat16)
    assert torch.equal(K.plain_keys(K.cache_keys(x))[:, :, :40], x)
    assert torch.equal(K.plain_values(K.cache_values(x))[:, :, :40], x)


@needs_kernels
def test_rope_rotates_queries_and_keys_as_the_eager_ops_do():
    torch.manual_seed(2)
    n, heads, kv, hd = 3, 6, 2, 16
    stacked = torch.randn(n, (heads + 2 * kv) * hd)  # q, k, v of one stacked projection: strided row views
    qk = stacked[:, :(heads + kv) * hd].view(n, heads + kv, hd)
    cos, sin = torch.randn(n, heads + kv, hd), torch.randn(n, heads + kv, hd)
    rotated = LeanLlama._rotate(qk, cos, sin)
    q, k = K.rope(qk, cos, sin, heads)
    assert q.shape == (n, heads, hd) and k.shape == (n, kv, hd)
    assert (q - rotated[:, :heads]).abs().max() < 1e-6 and (k - rotated[:, heads:]).abs().max() < 1e-6


def _eager_attend(q, kc, vc, bias, width):
    n, heads, hd = q.shape
    kv = kc.shape[1]
    scores = torch.matmul(q.view(n, kv, heads // kv, hd), kc[..., :width])
    if bias is not None:
        scores = scores + bias[:, None, None, :width]
    return torch.matmul(scores.softmax(-1), vc[:, :, :width]).view(n, heads, hd)


def _attend_new(q, pk, pv, plen, bias, of_row, k, v, width, strided: bool = False):
    """K.attend with a new key and value (random) for column width - 1, checking they were written there."""
    n, kv, hd = q.shape[0], pk.shape[1], q.shape[2]
    new_k = torch.randn(n, kv, hd).to(v.dtype)
    new_v = torch.randn(n, 2 * kv * hd)[:, kv * hd:].view(n, kv, hd) if strided else torch.randn(n, kv, hd)
    new_v = new_v.to(v.dtype)
    got = K.attend(q, pk, pv, plen, bias, of_row, k, v, new_k, new_v, width)
    assert torch.equal(K.plain_keys(k)[:, :, width - 1], new_k)
    assert torch.equal(K.plain_values(v)[:, :, width - 1], new_v)
    return got


def _per_row(prompt_k, prompt_v, plen, prompt_bias, prompt_of_row, k, v, width):
    """Each row's whole cache (its prompt's columns, then its own first `width`) and bias, as the eager step has
    them (float32): keys (n, kv, hd, columns), values (n, kv, columns, hd)."""
    keys = [K.plain_keys(prompt_k)[:, :, :plen][prompt_of_row], K.plain_keys(k)[:, :, :width]]
    kc = torch.cat(keys, dim=2).transpose(2, 3).float()
    vc = torch.cat([K.plain_values(prompt_v)[:, :, :plen][prompt_of_row], K.plain_values(v)[:, :, :width]], 2).float()
    bias = None if prompt_bias is None else torch.cat([prompt_bias[prompt_of_row], torch.zeros(k.shape[0], width)], -1)
    return kc, vc, bias, kc.shape[-1]


def _eager_like_the_kernel(q, kc, vc, bias, width):
    """The attention as the kernel computes it: in bfloat16 with the CPU's dot products, the queries and the
    weights rounded to bfloat16 first (as the eager bfloat16 step rounds them); else float32 throughout."""
    if vc.dtype == torch.bfloat16 and K.pairs_layout():
        n, heads, hd = q.shape
        kv = kc.shape[1]
        scores = torch.matmul(q.bfloat16().float().view(n, kv, heads // kv, hd), kc.float()[..., :width])
        if bias is not None:
            scores = scores + bias[:, None, None, :width]
        weights = scores.softmax(-1).bfloat16().float()
        return torch.matmul(weights, vc.float()[:, :, :width]).view(n, heads, hd)
    return _eager_attend(q, kc.float(), vc.float(), bias, width)


def _close(got, want, dtype) -> bool:
    """float32: to 1e-5. bfloat16: each value within 2 bfloat16 steps, plus 2^-7 for values near 0 (the reference
    rounds the same weights, but a weight a hair from a rounding boundary may round the other way in one of them:
    2^-9 of a weight times a value of up to about 4)."""
    if dtype == torch.float32:
        return bool((got - want).abs().max() < 1e-5)
    return bool(((got.float() - want).abs() <= 2 * BF16_ULP * want.abs() + 2.0**-7).all())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv,rep", [(4, 1), (2, 3), (1, 5)])  # rep 5: two passes of at most 4 query heads
@pytest.mark.parametrize("width", [1, 7, 8, 9, 37, 64])  # below, at and past blocks of 8, 16 and 32 columns
@pytest.mark.parametrize("plen", [5, 33])  # odd: the bfloat16 pairs end in a padding column
def test_attend_matches_the_eager_softmax_attention(dtype, kv, rep, width, plen):
    torch.manual_seed(3)
    n, hd, cols = 5, 32, 64
    q = torch.randn(n, kv * rep, hd) * 0.3
    prompt_keys, prompt_values = torch.randn(3, kv, plen, hd).to(dtype), torch.randn(3, kv, plen, hd).to(dtype)
    pk, pv = K.cache_keys(prompt_keys), K.cache_values(prompt_values)
    bias = torch.zeros(3, plen)
    bias[1, :3] = float("-inf")  # prompt 1 is left-padded
    of_row = torch.tensor([1, 0, 1, 2, 0])  # rows as compaction leaves them: not in prompt order
    k, v = K.cache_keys(torch.randn(n, kv, cols, hd).to(dtype)), K.cache_values(torch.randn(n, kv, cols, hd).to(dtype))
    got = _attend_new(q, pk, pv, plen, bias, of_row, k, v, width, strided=True)
    assert got.dtype == dtype
    assert _close(got, _eager_like_the_kernel(q, *_per_row(pk, pv, plen, bias, of_row, k, v, width)), dtype)
    got = _attend_new(q, pk, pv, plen, None, of_row, k, v, width)
    want = _eager_like_the_kernel(q, *_per_row(pk, pv, plen, None, of_row, k, v, width))
    assert _close(got, want, dtype)
    # key columns past the prompt (allocated in whole blocks) and past `width` are never used: NaN there
    nan = float("nan")
    pcols = K.plain_values(pv).shape[2]  # the prompt's columns rounded up to a block
    padded = K.cache_keys(torch.cat([prompt_keys, torch.full((3, kv, pcols - plen, hd), nan, dtype=dtype)], dim=2))
    keys = K.plain_keys(k)
    keys[:, :, width:] = nan
    new_k, new_v = keys[:, :, width - 1].contiguous(), K.plain_values(v)[:, :, width - 1].clone()  # the same again
    got = K.attend(q, padded, pv, plen, None, of_row, K.cache_keys(keys), v, new_k, new_v, width)
    assert _close(got, want, dtype)


@needs_kernels
def test_attend_gives_a_masked_column_no_weight_at_all():
    # scores all 0 (q = 0) over the prompt's two columns, the second masked, and one generated column: weights
    # [0.5, 0, 0.5], so the output is (2 + 4) / 2 = 3 exactly, however large the masked column's value
    q = torch.zeros(1, 1, 16)
    prompt_values = torch.zeros(1, 1, 2, 16)
    prompt_values[0, 0, 0], prompt_values[0, 0, 1] = 2.0, 1e30
    pk, pv = K.cache_keys(torch.zeros(1, 1, 2, 16)), K.cache_values(prompt_values)
    k, v = K.cache_keys(torch.zeros(1, 1, 32, 16)), K.cache_values(torch.zeros(1, 1, 32, 16))
    new_k, new_v = torch.zeros(1, 1, 16), torch.full((1, 1, 16), 4.0)  # the generated column's key and value
    bias, of_row = torch.tensor([[0.0, float("-inf")]]), torch.tensor([0])
    assert K.attend(q, pk, pv, 2, bias, of_row, k, v, new_k, new_v, 1).tolist() == [[[3.0] * 16]]
    # unmasked: weights [1/3, 1/3, 1/3] -> (2 + 4 + 4) / 3 with the second value 4
    prompt_values[0, 0, 1] = 4.0
    pv = K.cache_values(prompt_values)
    assert torch.allclose(K.attend(q, pk, pv, 2, None, of_row, k, v, new_k, new_v, 1), torch.full((1, 1, 16), 10 / 3))
    with pytest.raises(ValueError, match="prompt_of_row must be"):
        K.attend(q, pk, pv, 2, None, of_row.int(), k, v, new_k, new_v, 1)
    with pytest.raises(ValueError, match="blocks of 32 columns"):
        K.attend(q, pk, pv, 2, None, of_row, K.plain_keys(k).contiguous(), v, new_k, new_v, 1)


def _model_and_prompts(seed: int):
    """A small random Llama (6 query heads over 2 key/value heads) and two prompts of 5, one left-padded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2)).eval()
    ids = torch.randint(3, 300, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # padding: the cache's -inf bias
    return model, ids, mask


@needs_kernels
def test_the_fused_decode_step_gives_the_eager_logits(monkeypatch):
    monkeypatch.setattr(decode_step, "SMALL_STEP_BYTES", 0)  # the per-operation kernels (tests/test_decode_step.py:
    model, ids, mask = _model_and_prompts(4)                  # the one-call step of small models)
    eager, fused = (LeanLlama.from_model(model, rows=6, fused=f) for f in (False, True))
    assert fused.fused and not eager.fused and fused.step is None
    with torch.no_grad():
        _, kvs = eager.prefill(ids, mask)
        caches = [side.new_cache(kvs, mask, 3, 7) for side in (eager, fused)]
        assert isinstance(caches[0], StaticKVCache) and isinstance(caches[1], SharedPromptKVCache)
        tokens, positions = torch.randint(3, 300, (6,)), mask.sum(-1).repeat_interleave(3)
        for step in range(5):
            if step == 3:  # rows 1, 3 (one of each prompt) finished: compacted away
                keep = torch.tensor([0, 2, 4, 5])
                for cache in caches:
                    cache.keep(keep)
                tokens, positions = tokens[keep], positions[keep]
            a = eager.decode(tokens, positions + step, caches[0], 5 + step)
            b = fused.decode(tokens, positions + step, caches[1], 5 + step)
            assert (a - b).abs().max() < 1e-5, step


BF16_ULP = 2.0**-7  # bfloat16 keeps 8 significant bits: neighbours 2^-7 apart relative to the leading bit


def _within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, ulps: float = 1.0) -> bool:
    """Each value of `got` (bfloat16) within `ulps` bfloat16 steps of the float32 `want`."""
    return bool(((got.float() - want.float()).abs() <= ulps * BF16_ULP * want.float().abs() + 1e-30).all())


@needs_kernels
def test_bf16_stores_round_to_nearest_ties_to_even():
    # bfloat16 steps near 1 are 2^-7 = 0.0078125. 1 + 2^-8 lies halfway between 1 (last bit 0, even) and
    # 1.0078125 (odd): it rounds to 1. 1.0078125 + 2^-8 lies halfway between 1.0078125 (odd) and 1.015625 (even):
    # up. 1 + 3 * 2^-9 = 1.005859 is past halfway: 1.0078125. The residual sum is stored into x rounded so.
    x = torch.tensor([[1.0, 1.0078125, 1.0]], dtype=torch.bfloat16)
    y = torch.tensor([[2.0**-8, 2.0**-8, 3 * 2.0**-9]], dtype=torch.bfloat16)
    K.add_rms_norm(x, y, torch.ones(3, dtype=torch.bfloat16), 0.0)
    assert x.tolist() == [[1.0, 1.015625, 1.0078125]] == (torch.tensor([[1.0, 1.0078125, 1.0]],
                                                                       dtype=torch.bfloat16) + y).tolist()


@needs_kernels
def test_bf16_rms_norm_and_silu_mul_round_where_torch_does():
    # silu(1) = 0.7310586 -> bfloat16 0.73046875 (1.4609375 x 2^-1); times 3 = 2.19140625 -> 2.1875 (steps of
    # 2^-6 = 0.015625 at 2: 2.1875 + 0.0039 is below the halfway 2.1953)
    one = torch.tensor([[1.0]], dtype=torch.bfloat16)
    assert K.silu_mul(one, one * 3).item() == 2.1875 == (F.silu(one) * (one * 3)).item()
    torch.manual_seed(5)
    g, u = (torch.randn(4, 2 * 37) * 3).to(torch.bfloat16), torch.randn(4, 37).to(torch.bfloat16)
    assert _within_bf16_rounding(K.silu_mul(g[:, :37], u), F.silu(g[:, :37]) * u)
    x, y, w = (torch.randn(*shape).to(torch.bfloat16) for shape in ((5, 77), (5, 77), (77,)))
    want_x = x + y
    want = w * F.rms_norm(want_x, (77,), eps=1e-5)  # torch's bfloat16 ops, as the eager decode runs them
    got = K.add_rms_norm(x, y, w, 1e-5)
    assert torch.equal(x, want_x) and _within_bf16_rounding(got, want)


@needs_kernels
def test_bf16_rope_computes_in_float32_and_attend_checks_dtypes():
    torch.manual_seed(6)
    n, heads, kv, hd, cols, column = 3, 6, 2, 32, 32, 9
    qk = torch.randn(n, heads + kv, hd).to(torch.bfloat16)
    v = torch.randn(n, kv, hd).to(torch.bfloat16)
    cos, sin = torch.randn(n, heads + kv, hd), torch.randn(n, heads + kv, hd)
    rotated = LeanLlama._rotate(qk.float(), cos, sin)  # the float32 rotation of the bfloat16 inputs
    q, k = K.rope(qk, cos, sin, heads)
    assert q.dtype == torch.float32 and (q - rotated[:, :heads]).abs().max() < 1e-5  # never rounded
    assert k.dtype == torch.bfloat16 and _within_bf16_rounding(k, rotated[:, heads:])
    kc, vc = (K.cache_keys(torch.randn(n, kv, cols, hd).to(torch.bfloat16)),
              K.cache_values(torch.randn(n, kv, cols, hd).to(torch.bfloat16)))
    pk, pv = (K.cache_keys(torch.randn(2, kv, 7, hd).to(torch.bfloat16)),
              K.cache_values(torch.randn(2, kv, 7, hd).to(torch.bfloat16)))
    of_row = torch.tensor([1, 0, 1])
    out = K.attend(q, pk, pv, 7, None, of_row, kc, vc, k, v, column + 1)
    assert out.dtype == torch.bfloat16 and torch.equal(K.plain_keys(kc)[:, :, column], k)
    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        K.attend(q, pk, pv, 7, None, of_row, kc, vc, k, v.float(), column + 1)
    with pytest.raises(ValueError, match="where float32 is needed"):
        K.attend(q.to(torch.bfloat16), pk, pv, 7, None, of_row, kc, vc, k, v, column + 1)


@needs_kernels
def test_the_fused_bf16_decode_step_is_as_close_to_float32_as_the_eager_one():
    model, ids, mask = _model_and_prompts(7)
    sides = [LeanLlama.from_model(model, dt, rows=6, fused=f)
             for dt, f in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True))]
    assert sides[2].fused and not sides[1].fused
    errors = {1: [], 2: []}
    with torch.no_grad():
        caches = [s.new_cache(s.prefill(ids, mask)[1], mask, 3, 7) for s in sides]
        tokens, positions = torch.randint(3, 300, (6,)), mask.sum(-1).repeat_interleave(3)
        for step in range(4):
            logits = [s.decode(tokens, positions + step, c, 5 + step) for s, c in zip(sides, caches)]
            for i in (1, 2):
                errors[i].append(float((logits[i] - logits[0]).abs().mean()))
    # bfloat16 weights set the error (about 1e-3 here); the fused step rounds less inside, never more
    assert 0 < sum(errors[2]) <= 1.25 * sum(errors[1]), errors


def test_the_kernels_can_be_switched_off_and_a_failed_build_falls_back(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv(K.ENV, "0")
    assert K.kernels() is None and not list(fresh_build.iterdir())  # nothing built
    K.kernels.cache_clear()
    monkeypatch.delenv(K.ENV)
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with caplog.at_level(logging.WARNING):
        assert K.kernels() is None
    assert "decoding with torch's kernels" in caplog.text
    assert not K.usable(torch.float32, 64, torch.device("cpu"))
    K.kernels.cache_clear()
    monkeypatch.setenv(K.ENV, "1")  # asked for: the failure is an error naming the variable
    with pytest.raises(RuntimeError, match="LIGHTNING_RLHF_KERNELS=1 but"):
        K.kernels()
    K.kernels.cache_clear()
    monkeypatch.setenv(K.ENV, "yes")
    with pytest.raises(ValueError, match="set it to 0"):
        K.kernels()


@needs_kernels
def test_a_build_is_cached_by_source_compiler_and_cpu(fresh_build):
    lib, compiler = K.kernels(), os.environ.get("CC") or "cc"
    built = list(fresh_build.iterdir())
    assert lib is not None and [p.name for p in built] == [K.library_path(compiler).name]
    assert K.library_path(compiler) != K.library_path(compiler + "-other")


def test_fused_decoding_asked_for_where_it_cannot_run_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="rollout.engine_kwargs.cpu_kernels"):
        LeanLlama.from_model(model, torch.float16, fused=True)
    assert not LeanLlama.from_model(model, torch.float16).fused  # unasked: eager, quietly


@needs_kernels
def test_sample_by_hand():
    # logits [0, ln 3]: probabilities [0.25, 0.75]; the first token whose cumulative weight reaches u:
    # u = 0.2 -> token 0 (0.2 <= 0.25), u = 0.3 -> token 1; log-probs ln 0.25 = -1.386294, ln 0.75 = -0.287682
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    u = torch.tensor([[0.2], [0.3]], dtype=torch.float64)
    tokens, logps = K.sample(logits, 1.0, u, None)
    assert tokens.tolist() == [0, 1] and torch.allclose(logps, torch.tensor([-1.386294, -0.287682]))
    # temperature 2 on logits [0, 2 ln 3] is the same distribution
    tokens, logps = K.sample(logits * 2, 2.0, u, None)
    assert tokens.tolist() == [0, 1] and torch.allclose(logps, torch.tensor([-1.386294, -0.287682]))
    # token 1 banned: token 0 whatever u, its log-prob still under the unbanned distribution (ln 0.25)
    tokens, logps = K.sample(logits, 1.0, u, torch.tensor([1]))
    assert tokens.tolist() == [0, 0] and torch.allclose(logps, torch.tensor([-1.386294] * 2))
    # all the mass banned (token 0 is e^-100 of it): no answer, the caller's general path takes over
    assert K.sample(torch.tensor([[-100.0, 0.0]]), 1.0, u[:1], torch.tensor([1])) is None


@needs_kernels
@pytest.mark.parametrize("vocab", [300, 49152 + 37])  # one level's worth; many blocks of 256 and a short last one
def test_sample_picks_the_token_of_the_two_level_torch_inversion(vocab):
    from lightning_rlhf.rollout.static import _invert_cdf
    torch.manual_seed(5)
    logits = torch.randn(64, vocab) * 4
    u = 1.0 - torch.rand(64, 1, dtype=torch.float64)
    tokens, logps = K.sample(logits, 0.7, u, torch.tensor([3, 7]))
    probs = (logits / 0.7).softmax(-1)
    want_logp = probs.log().gather(-1, tokens[:, None])[:, 0]
    probs[:, [3, 7]] = 0.0
    assert torch.equal(tokens, _invert_cdf(probs, u)) and not bool(torch.isin(tokens, torch.tensor([3, 7])).any())
    assert (logps - want_logp).abs().max() < 1e-5


@needs_kernels
def test_sample_reads_bf16_logits_as_their_float32_copy():
    torch.manual_seed(6)
    logits = (torch.randn(16, 1000) * 3).to(torch.bfloat16)
    u = 1.0 - torch.rand(16, 1, dtype=torch.float64)
    got, want = K.sample(logits, 0.7, u, torch.tensor([2])), K.sample(logits.float(), 0.7, u, torch.tensor([2]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
