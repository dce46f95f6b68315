"""KL estimators k1, k2, k3 against hand-worked numbers and exact expectations."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.functional import KL_ESTIMATORS, kl_penalty

LOGP = torch.tensor([[-1.0, -2.0, -0.3]])
REF = torch.tensor([[-1.5, -1.0, -0.3]])
# d = ref - logp = [-0.5, 1.0, 0.0]


def test_k1_hand_example():
    # k1 = -d = [0.5, -1.0, 0.0]
    assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))


def test_k2_hand_example():
    # k2 = d^2 / 2 = [0.25 / 2, 1 / 2, 0] = [0.125, 0.5, 0.0]
    assert_close(kl_penalty(LOGP, REF, "k2"), torch.tensor([[0.125, 0.5, 0.0]]))


def test_k3_hand_example_and_default():
    # k3 = e^d - d - 1: e^-0.5 + 0.5 - 1 = 0.606531 - 0.5 = 0.106531 ; e^1 - 1 - 1 = 0.718282 ; 1 - 0 - 1 = 0
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert_close(kl_penalty(LOGP, REF, "k3"), expected)
    assert_close(kl_penalty(LOGP, REF), expected)  # k3 is the default


def test_k3_clamped_for_stability():
    # d = 50 is clamped to 20: e^20 - 20 - 1 = 485165174.4 (finite), d = -50 -> -20: e^-20 + 20 - 1 ~ 19
    out = kl_penalty(torch.tensor([[0.0, 0.0]]), torch.tensor([[50.0, -50.0]]), "k3")
    assert torch.isfinite(out).all()
    assert_close(out, torch.tensor([[math.exp(20) - 21.0, math.exp(-20) + 19.0]]))


def test_unbiasedness_exact_expectation():
    # tokens x ~ p over 3 outcomes; KL(p || q) = sum p ln(p/q)
    # p = [0.5, 0.3, 0.2], q = [0.2, 0.3, 0.5]: 0.5 ln 2.5 + 0 + 0.2 ln 0.4 = 0.3 * ln 2.5 = 0.274887
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = 0.3 * math.log(2.5)
    logp, logq = p.log().unsqueeze(0), q.log().unsqueeze(0)
    expect = {k: float((p * kl_penalty(logp, logq, k)[0]).sum()) for k in ("k1", "k2", "k3")}
    assert expect["k1"] == pytest.approx(true_kl, rel=1e-9)  # unbiased
    assert expect["k3"] == pytest.approx(true_kl, rel=1e-9)  # unbiased
    assert expect["k2"] != pytest.approx(true_kl, rel=1e-2)  # biased
    # k3 >= 0 per token, k1 is negative where q > p (third outcome: ln 0.2 - ln 0.5 < 0)
    assert (kl_penalty(logp, logq, "k3") >= 0).all()
    assert kl_penalty(logp, logq, "k1")[0, 2] < 0


def test_k3_gradient_wrt_logp():
    # d k3 / d logp = d/dlogp [e^(ref - logp) - (ref - logp) - 1] = 1 - e^d ; d = [-0.5, 1, 0]
    logp = LOGP.clone().requires_grad_(True)
    kl_penalty(logp, REF, "k3").sum().backward()
    assert_close(logp.grad, torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0]]))


def test_low_precision_upcast():
    out = kl_penalty(LOGP.to(torch.bfloat16), REF.to(torch.bfloat16))
    assert out.dtype == torch.float32


def test_registry_and_errors():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 2\)"):
        kl_penalty(LOGP, REF[:, :2])
