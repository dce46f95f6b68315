"""Masked sum / mean / var / whiten against hand-worked numbers."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.functional import masked_mean, masked_sum, masked_var, masked_whiten

# x and mask used throughout: real tokens are 1, 2 (row 0) and 4 (row 1).
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_all_and_per_dim():
    # all: 1 + 2 + 4 = 7
    assert_close(masked_sum(X, M), torch.tensor(7.0))
    # per row: [1 + 2, 4] = [3, 4]
    assert_close(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]))
    # per column: [1 + 4, 2, nothing] = [5, 2, 0]
    assert_close(masked_sum(X, M, dim=0), torch.tensor([5.0, 2.0, 0.0]))


def test_masked_mean_all_and_per_dim():
    # all: (1 + 2 + 4) / 3 = 7/3
    assert_close(masked_mean(X, M), torch.tensor(7.0 / 3.0))
    # per row: [(1 + 2) / 2, 4 / 1] = [1.5, 4]
    assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]))
    # per column: [(1 + 4) / 2, 2 / 1, empty -> 0] = [2.5, 2, 0]
    assert_close(masked_mean(X, M, dim=0), torch.tensor([2.5, 2.0, 0.0]))


def test_bool_mask_equals_float_mask():
    assert_close(masked_mean(X, M.bool()), masked_mean(X, M))
    assert_close(masked_sum(X, M.bool(), dim=1), masked_sum(X, M, dim=1))


def test_empty_mask_gives_zero_not_nan():
    assert_close(masked_mean(X, torch.zeros_like(M)), torch.tensor(0.0))


def test_padding_values_change_nothing_even_nan_and_inf():
    garbage = X.clone()
    garbage[0, 2] = float("nan")
    garbage[1, 1] = float("inf")
    garbage[1, 2] = -1e30
    assert_close(masked_mean(garbage, M), masked_mean(X, M))
    assert_close(masked_sum(garbage, M, dim=1), masked_sum(X, M, dim=1))
    # and no NaN flows back into the gradient
    g = garbage.clone().requires_grad_(True)
    masked_mean(g, M).backward()
    # d mean / d x = 1/3 on each real token, 0 on padding
    assert_close(g.grad, M / 3.0)


def test_masked_var_biased_and_unbiased():
    # real values 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    # biased var = (42/9) / 3 = 14/9 ; unbiased = (42/9) / 2 = 7/3
    assert_close(masked_var(X, M, unbiased=False), torch.tensor(14.0 / 9.0))
    assert_close(masked_var(X, M, unbiased=True), torch.tensor(7.0 / 3.0))


def test_masked_var_unbiased_needs_two_tokens():
    one = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_var(X, one)
    # the biased variance of one number is 0
    assert_close(masked_var(X, one, unbiased=False), torch.tensor(0.0))


def test_masked_whiten_hand_example():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    # real values 1, 3: mean 2, unbiased var ((1-2)^2 + (3-2)^2) / (2-1) = 2, std sqrt(2)
    # whitened: [(1-2)/sqrt2, (3-2)/sqrt2, padding 0] = [-0.70711, 0.70711, 0]
    s = 1.0 / math.sqrt(2.0)
    assert_close(masked_whiten(x, m, eps=0.0), torch.tensor([[-s, s, 0.0]]))
    # shift_mean=False adds the mean 2 back: [2 - 0.70711, 2 + 0.70711, 0]
    assert_close(masked_whiten(x, m, shift_mean=False, eps=0.0), torch.tensor([[2 - s, 2 + s, 0.0]]))


def test_masked_whiten_has_zero_mean_unit_var_on_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 5) * 4 + 7
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    w = masked_whiten(x, m)
    assert_close(masked_mean(w, m), torch.tensor(0.0), atol=1e-5, rtol=0)
    assert_close(masked_var(w, m), torch.tensor(1.0), atol=1e-5, rtol=1e-5)
    assert (w[m == 0] == 0).all()


def test_low_precision_inputs_are_reduced_in_float32():
    xb = X.to(torch.bfloat16)
    out = masked_mean(xb, M)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor(7.0 / 3.0))
    assert masked_whiten(xb, M).dtype == torch.float32
    # float64 stays float64
    assert masked_mean(X.double(), M).dtype == torch.float64


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        masked_mean(X, torch.ones(2, 2))
