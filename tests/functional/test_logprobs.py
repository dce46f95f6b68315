"""Log-probs and entropies from logits: hand-worked distributions, bf16, chunking, -inf logits."""

import math

import pytest
import torch
from torch.testing import assert_close

import lightning_rlhf.functional.logprobs as logprobs_mod
from lightning_rlhf.functional import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits

# Position 0: logits log([1, 2, 1]) -> p = [0.25, 0.5, 0.25]; position 1: uniform over 3 (logits 0).
LOGITS = torch.log(torch.tensor([[[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]]))  # (B=1, T=2, V=3)


def test_logprobs_hand_example():
    tokens = torch.tensor([[1, 2]])
    # token 1 at position 0: log 0.5 = -0.693147; token 2 at position 1: log(1/3) = -1.098612
    expected = torch.tensor([[math.log(0.5), math.log(1.0 / 3.0)]])
    assert_close(logprobs_from_logits(LOGITS, tokens), expected)
    tokens = torch.tensor([[0, 0]])
    # token 0 at position 0: log 0.25 = -1.386294
    assert_close(logprobs_from_logits(LOGITS, tokens)[0, 0], torch.tensor(math.log(0.25)))


def test_logprobs_shift_invariant_and_stable_for_huge_logits():
    z = torch.tensor([[[0.0, 1.0, 2.0]]])
    tokens = torch.tensor([[2]])
    # log softmax(z)[2] = 2 - ln(e^0 + e^1 + e^2) = 2 - 2.407606 = -0.407606
    expected = torch.tensor([[2.0 - math.log(1.0 + math.e + math.e**2)]])
    assert_close(logprobs_from_logits(z, tokens), expected)
    # softmax(z + c) = softmax(z): adding 1e4 (exact in float32 for integer logits) changes nothing
    # and must not overflow exp
    assert_close(logprobs_from_logits(z + 1e4, tokens), expected)


def test_logprobs_bf16_input_computed_in_float32():
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 11) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, 11, (2, 4))
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32
    # same numbers as upcasting first, then log_softmax + gather in float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert_close(out, ref)


def test_logprobs_chunked_matches_full_and_gradients(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    # 10 elements per chunk with V=7 -> one row per chunk: 15 chunks
    monkeypatch.setattr(logprobs_mod, "_CHUNK_ELEMENTS", 10)
    out = logprobs_from_logits(logits, tokens)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    assert_close(out, ref)
    assert_close(g_out, g_ref)


def test_logprobs_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(1, 2, 3\).*\(1, 3\)"):
        logprobs_from_logits(LOGITS, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="integer"):
        logprobs_from_logits(LOGITS, torch.tensor([[0.0, 1.0]]))


def test_entropy_hand_example():
    # p = [0.25, 0.5, 0.25]: H = -(2 * 0.25 * ln 0.25 + 0.5 * ln 0.5) = 0.5 ln 4 + 0.5 ln 2 = 1.5 ln 2
    # uniform over 3: H = ln 3
    expected = torch.tensor([[1.5 * math.log(2.0), math.log(3.0)]])
    assert_close(entropy_from_logits(LOGITS), expected)


def test_entropy_stable_for_peaked_and_huge_logits():
    # [100, 0, 0]: p ~ [1, e^-100, e^-100] -> H ~ 0 ; [1000, 1000]: uniform over 2 -> ln 2, no overflow
    peaked = entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]]))
    assert_close(peaked, torch.tensor([[0.0]]), atol=1e-6, rtol=0)
    huge = entropy_from_logits(torch.tensor([[[1000.0, 1000.0]]]))
    assert_close(huge, torch.tensor([[math.log(2.0)]]))


def test_entropy_with_minus_inf_logits_is_finite_with_finite_grad():
    # [0, 0, -inf]: p = [0.5, 0.5, 0] -> H = ln 2 ; the -inf entry contributes 0 * -inf := 0
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(logits)
    assert_close(h, torch.tensor([[math.log(2.0)]]))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_matches_categorical_and_bf16(monkeypatch):
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6) * 2
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert_close(entropy_from_logits(logits), ref)
    monkeypatch.setattr(logprobs_mod, "_CHUNK_ELEMENTS", 1)  # one row per chunk
    assert_close(entropy_from_logits(logits), ref)
    out = entropy_from_logits(logits.to(torch.bfloat16))
    assert out.dtype == torch.float32
    ref_bf16 = torch.distributions.Categorical(logits=logits.to(torch.bfloat16).float()).entropy()
    assert_close(out, ref_bf16)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_equal_the_two_functions_bit_for_bit(temperature, dtype):
    # The lean path (one logsumexp, gradient written out, no float32 copy kept) against the plain one
    # under autograd: the same float operations, so equal to the last bit, values and gradients alike.
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 1000) * 3).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 1000, (3, 5))
    w = torch.randn(3, 5)
    plain = logprobs_from_logits(x.float() / temperature, tokens)
    plain_entropy = entropy_from_logits((x.float() / temperature).detach())
    (plain * w).sum().backward()
    plain_grad, x.grad = x.grad.clone(), None
    lean, lean_entropy = logprobs_and_entropy(x, tokens, temperature)
    (lean * w).sum().backward()
    assert torch.equal(lean, plain) and torch.equal(lean_entropy, plain_entropy)
    assert torch.equal(x.grad, plain_grad)
    assert not lean_entropy.requires_grad


def test_logprobs_and_entropy_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]; token 1: log 3/4 = -0.28768; H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.56233
    logits = torch.tensor([[[0.0, float(torch.tensor(3.0).log())]]])
    logp, entropy = logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert abs(float(logp) - (-0.287682)) < 1e-5 and abs(float(entropy) - 0.562335) < 1e-5
