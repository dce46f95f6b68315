"""Keyed sampling (`rollout.sampling_seed`): each response's random numbers come from its key, so a prompt
draws the same responses alone or in any batch, in any chunking, and a different step draws others."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.rollout import ROLLOUT_ENGINES, SamplingParams, sequence_logprobs
from lightning_rlhf.rollout.keyed import keyed_uniform, prompt_keys, row_keys, splitmix64
from lightning_rlhf.rollout.static import sample_tokens
from tests.test_static_engine import EOS_SET, PAD, llama, prompts

MASK64 = (1 << 64) - 1


def py_splitmix64(x: int) -> int:
    """splitmix64's mixer on Python integers (unsigned 64-bit), an independent reference."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def test_splitmix64_matches_the_reference_sequence():
    # splitmix64 seeded with 0: state k * 0x9e3779b97f4a7c15; its first output is the published 0xe220a8397b1dcdaf
    assert py_splitmix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    states = [(k * 0x9E3779B97F4A7C15) & MASK64 for k in range(1, 6)] + [0, 1, MASK64, 1 << 63]
    got = splitmix64(torch.tensor([signed(s) for s in states], dtype=torch.long))
    assert got.tolist() == [signed(py_splitmix64(s)) for s in states]


def test_keyed_uniforms_are_in_range_deterministic_and_uniform():
    keys = row_keys(prompt_keys([f"q{i}" for i in range(1000)], seed=0, step=0), 50)  # 50000 rows
    u = keyed_uniform(keys, 3)
    assert u.shape == (50000, 1) and u.dtype == torch.float64
    assert float(u.min()) > 0.0 and float(u.max()) <= 1.0
    assert torch.equal(u, keyed_uniform(keys, 3))
    # mean 0.5 and variance 1/12 of U(0, 1); standard errors 0.0013 and 0.0004 at n = 50000
    assert abs(float(u.mean()) - 0.5) < 0.006 and abs(float(u.var()) - 1 / 12) < 0.002
    # deciles hold a tenth each (standard error 0.0013)
    counts = torch.bincount((u[:, 0] * 10).ceil().long().clamp(1, 10) - 1, minlength=10).double() / 50000
    assert float((counts - 0.1).abs().max()) < 0.006
    # neighbouring positions and neighbouring keys are uncorrelated (|r| < 4 standard errors of 0.0045)
    other = keyed_uniform(keys, 4)
    assert abs(float(torch.corrcoef(torch.cat([u, other], 1).T)[0, 1])) < 0.018


def test_prompt_keys_depend_on_text_seed_and_step_only():
    a = prompt_keys(["1+1", "2+2"], seed=0, step=5)
    assert torch.equal(a, prompt_keys(["1+1", "2+2"], seed=0, step=5))
    assert a[0] != a[1]
    assert a[0] == prompt_keys(["7*3", "1+1"], seed=0, step=5)[1]        # not its place in the batch
    assert a[0] != prompt_keys(["1+1"], seed=0, step=6)[0]                # another step
    assert a[0] != prompt_keys(["1+1"], seed=1, step=5)[0]                # another seed


def test_sample_tokens_uses_the_given_uniforms():
    # probabilities [0.1, 0.2, 0.3, 0.4]: CDF 0.1, 0.3, 0.6, 1.0; u picks the first token whose CDF reaches it
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(5, 4).contiguous()
    u = torch.tensor([[0.05], [0.1], [0.2999], [0.61], [1.0]], dtype=torch.float64)
    tokens, _ = sample_tokens(logits, SamplingParams(eos_token_id=99, pad_token_id=0), ban_eos=False, u=u)
    assert tokens.tolist() == [0, 0, 1, 3, 3]


def sample(model, ids, mask, keys, **kw):
    engine = ROLLOUT_ENGINES.get("static")(**kw.pop("engine_kwargs", {}))
    return engine.generate(model, ids, mask, num_generations=3, max_new_tokens=12, temperature=1.0,
                           eos_token_id=EOS_SET, pad_token_id=PAD, prompt_keys=keys, **kw)


def test_a_prompt_draws_the_same_responses_alone_or_in_any_batch():
    model = llama()
    ids, mask = prompts()
    keys = prompt_keys(["a", "b", "c"], seed=0, step=0)
    torch.manual_seed(1)
    full = sample(model, ids, mask, keys)
    torch.manual_seed(2)  # torch's generator plays no part
    chunked = sample(model, ids, mask, keys, engine_kwargs={"max_batch_size": 3})  # one prompt per call
    assert torch.equal(full.response_ids, chunked.response_ids)
    for i in range(3):  # prompt i alone, cut to its own length (no left padding)
        n = int(mask[i].sum())
        alone = sample(model, ids[i:i + 1, -n:], mask[i:i + 1, -n:], keys[i:i + 1])
        width = alone.response_ids.shape[1]
        assert torch.equal(alone.response_ids, full.response_ids[3 * i:3 * i + 3, :width])
        torch.testing.assert_close(alone.logprobs, full.logprobs[3 * i:3 * i + 3, :width], atol=1e-5, rtol=0)
    # the G samples of a prompt differ from each other, and another step's keys draw other responses
    assert len({tuple(r) for r in full.response_ids[:3].tolist()}) > 1
    later = sample(model, ids, mask, prompt_keys(["a", "b", "c"], seed=0, step=1))
    assert not torch.equal(later.response_ids, full.response_ids)
    # the kept log-probs are still those of a teacher-forced pass
    torch.testing.assert_close(full.logprobs, sequence_logprobs(model, full, 1.0), atol=1e-4, rtol=0)


def test_engines_without_keys_refuse_them():
    ids, mask = prompts()
    with pytest.raises(ValueError, match="cannot sample with prompt_keys"):
        ROLLOUT_ENGINES.get("hf")().generate(llama(), ids, mask, eos_token_id=EOS_SET, pad_token_id=PAD,
                                             prompt_keys=prompt_keys(["a", "b", "c"], 0, 0))
    with pytest.raises(ValueError, match="one key per prompt"):
        sample(llama(), ids, mask, prompt_keys(["a"], 0, 0))
