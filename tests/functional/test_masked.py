"""Masked sum / mean / var / whiten against hand-worked numbers."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.functional import masked_mean, masked_sum, masked_var, masked_whiten, masked_whiten_all

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


# ------------------------------------------------------------------------- whitening across ranks


def _two_rank_whiten(x, mask, split, eps=1e-8):
    """Run masked_whiten_all on rows [:split] and [split:] as two "ranks" sharing summed statistics."""
    halves = [(x[:split], mask[:split]), (x[split:], mask[split:])]
    local = []
    for xh, mh in halves:  # pass 1: record each rank's local (sum, sum of squares, count)
        masked_whiten_all(xh, mh, all_reduce=lambda t: local.append(t.clone()) or t, eps=eps)
    summed = local[0] + local[1]  # what an all-reduce(SUM) would hand every rank
    return [masked_whiten_all(xh, mh, all_reduce=lambda t: summed, eps=eps) for xh, mh in halves]


def test_masked_whiten_all_without_all_reduce_is_masked_whiten():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    m = (torch.arange(5)[None, :] < torch.tensor([5, 2, 1, 4])[:, None]).float()
    assert torch.equal(masked_whiten_all(x, m), masked_whiten(x, m))
    assert torch.equal(masked_whiten_all(x, m, eps=1e-3), masked_whiten(x, m, eps=1e-3))


def test_masked_whiten_all_two_ranks_match_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    m = (torch.arange(5)[None, :] < torch.tensor([5, 2, 1, 4, 3, 5])[:, None]).float()
    x[m == 0] = float("nan")  # padding garbage must not leak
    whole = masked_whiten(x, m)
    top, bottom = _two_rank_whiten(x, m, split=2)
    assert_close(top, whole[:2], atol=1e-6, rtol=1e-6)
    assert_close(bottom, whole[2:], atol=1e-6, rtol=1e-6)
    assert top.dtype == torch.float32 and (top[m[:2] == 0] == 0).all()


def test_masked_whiten_all_hand_example():
    # real tokens 1, 2 (rank 0) and 3, 6 (rank 1): n = 4, sum = 12, mean 3
    # sum of squares 1 + 4 + 9 + 36 = 50 -> population var 50/4 - 9 = 3.5 -> unbiased 3.5 * 4/3 = 14/3
    x = torch.tensor([[1.0, 2.0, 7.0], [3.0, 6.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    s = math.sqrt(14 / 3)
    top, bottom = _two_rank_whiten(x, m, split=1, eps=0.0)
    assert_close(top, torch.tensor([[-2 / s, -1 / s, 0.0]]))
    assert_close(bottom, torch.tensor([[0.0, 3 / s, 0.0]]))


def test_masked_whiten_all_dtype_and_errors():
    x64 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = masked_whiten_all(x64, torch.ones(1, 2), all_reduce=lambda t: t)
    assert out.dtype == torch.float64
    xbf = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    assert masked_whiten_all(xbf, torch.ones(1, 2), all_reduce=lambda t: t).dtype == torch.float32
    with pytest.raises(ValueError, match="at least 2 real tokens across all ranks"):
        masked_whiten_all(x64, torch.tensor([[1.0, 0.0]]), all_reduce=lambda t: t)
