"""GAE and group-normalised (GRPO / Dr. GRPO) advantages against hand-worked numbers and naive loops."""

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.functional import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    gae_advantages,
    group_advantages,
    grpo_advantages,
)

# ---------------------------------------------------------------------------------------------- GAE

REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1: last position is padding (9s ignored)


def test_gae_hand_example_gamma1_lam05():
    adv, ret = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=0.5)
    # row 0 (V_3 = 0 after the last token):
    #   delta_2 = r_2 + 1*0 - V_2 = 1 - 0.7 = 0.3          A_2 = 0.3
    #   delta_1 = 0 + 1*0.7 - 0.6 = 0.1                    A_1 = 0.1 + 1*0.5*0.3 = 0.25
    #   delta_0 = 0 + 1*0.6 - 0.5 = 0.1                    A_0 = 0.1 + 1*0.5*0.25 = 0.225
    #   returns = A + V = [0.725, 0.85, 1.0]
    # row 1 (padding at t=2 counts as r = V = 0):
    #   delta_1 = 2 + 1*0 - 0.5 = 1.5                      A_1 = 1.5
    #   delta_0 = 0 + 1*0.5 - 1.0 = -0.5                   A_0 = -0.5 + 0.5*1.5 = 0.25
    #   returns = [0.25 + 1.0, 1.5 + 0.5, pad 0] = [1.25, 2.0, 0]
    assert_close(adv, torch.tensor([[0.225, 0.25, 0.3], [0.25, 1.5, 0.0]]))
    assert_close(ret, torch.tensor([[0.725, 0.85, 1.0], [1.25, 2.0, 0.0]]))


def test_gae_lam1_gives_discounted_monte_carlo_returns():
    r = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2]])
    m = torch.ones(1, 2)
    adv, ret = gae_advantages(r, v, m, gamma=0.9, lam=1.0)
    # delta_1 = 1 + 0.9*0 - 0.2 = 0.8                  A_1 = 0.8
    # delta_0 = 0 + 0.9*0.2 - 0.5 = -0.32              A_0 = -0.32 + 0.9*1*0.8 = 0.4
    # returns = [0.4 + 0.5, 0.8 + 0.2] = [0.9, 1.0] = discounted reward-to-go [0 + 0.9*1, 1]
    assert_close(adv, torch.tensor([[0.4, 0.8]]))
    assert_close(ret, torch.tensor([[0.9, 1.0]]))


def test_gae_lam0_is_one_step_td():
    adv, _ = gae_advantages(REWARDS, VALUES, MASK, gamma=1.0, lam=0.0)
    # A_t = delta_t: row 0 [0.1, 0.1, 0.3], row 1 [-0.5, 1.5, 0]
    assert_close(adv, torch.tensor([[0.1, 0.1, 0.3], [-0.5, 1.5, 0.0]]))


def test_gae_padding_values_change_nothing():
    r2, v2 = REWARDS.clone(), VALUES.clone()
    r2[1, 2], v2[1, 2] = -123.0, float("nan")
    a1, ret1 = gae_advantages(REWARDS, VALUES, MASK, lam=0.5)
    a2, ret2 = gae_advantages(r2, v2, MASK, lam=0.5)
    assert_close(a1, a2)
    assert_close(ret1, ret2)


def test_gae_outputs_are_detached_float32():
    v = VALUES.clone().to(torch.bfloat16).requires_grad_(True)
    adv, ret = gae_advantages(REWARDS, v, MASK)
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32


def _naive_gae(r, v, length, gamma, lam):
    """Textbook per-sequence loop over Python floats."""
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_v = v[t + 1] if t + 1 < length else 0.0
        delta = r[t] + gamma * next_v - v[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + vv for a, vv in zip(adv, v[:length])]


def test_gae_vectorised_matches_naive_loop():
    torch.manual_seed(0)
    B, T, gamma, lam = 5, 7, 0.97, 0.9
    r, v = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    adv, ret = gae_advantages(r, v, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        a_ref, ret_ref = _naive_gae(r[b].tolist(), v[b].tolist(), n, gamma, lam)
        assert_close(adv[b, :n], torch.tensor(a_ref, dtype=torch.float64))
        assert_close(ret[b, :n], torch.tensor(ret_ref, dtype=torch.float64))
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


# ------------------------------------------------------------------------------- group advantages


def test_group_advantages_hand_example():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    # group [1, 0, 0]: mean 1/3; unbiased var ((2/3)^2 + 2*(1/3)^2) / 2 = (6/9) / 2 = 1/3; std 0.57735
    #   A = [(2/3)/0.57735, (-1/3)/0.57735, same] = [1.154701, -0.577350, -0.577350]
    # group [1, 1, 1]: mean 1, std 0 -> A = 0 / (0 + eps) = 0
    expected = torch.tensor([2 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), 0.0, 0.0, 0.0])
    assert_close(group_advantages(r, 3, eps=0.0)[:3], expected[:3])
    assert_close(group_advantages(r, 3), expected, atol=1e-5, rtol=1e-5)  # eps=1e-6 barely moves it


def test_group_advantages_groups_are_consecutive():
    r = torch.tensor([0.0, 1.0, 0.0, 1.0])
    # groups [0, 1] and [0, 1] (consecutive, not interleaved [0, 0], [1, 1] which would give 0s):
    # mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.707107 -> A = -0.5/0.707107, 0.5/0.707107
    s = 0.5 / math.sqrt(0.5)
    assert_close(group_advantages(r, 2, eps=0.0), torch.tensor([-s, s, -s, s]))


def test_dr_grpo_no_std_scaling():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    # groups [1, 0, 0] mean 1/3 -> [2/3, -1/3, -1/3] ; [3, 1, 2] mean 2 -> [1, -1, 0]
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0])
    assert_close(group_advantages(r, 3, scale_by_std=False), expected)
    assert_close(dr_grpo_advantages(r, 3), expected)
    # the registry entry takes per-token rewards (B, T) and a mask; one token per row here
    adv, _ = ADVANTAGE_ESTIMATORS.get("dr_grpo")(r[:, None], torch.ones(6, 1), group_size=3)
    assert_close(adv[:, 0], expected)


def test_grpo_registry_entries():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    # [1, 3]: mean 2, std sqrt2 -> [-1/sqrt2, 1/sqrt2] ; [2, 2]: std 0 -> A = 0 (not 0/0 = NaN at eps=0)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([-s, s, 0.0, 0.0])
    assert_close(grpo_advantages(r, 2, eps=0.0), expected)
    adv, ret = ADVANTAGE_ESTIMATORS.get("grpo")(r[:, None], torch.ones(4, 1), group_size=2)
    assert_close(adv[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(adv, ret)  # critic-free estimators: returns = advantages
    adv, ret = ADVANTAGE_ESTIMATORS.get("gae")(REWARDS, MASK, values=VALUES, gamma=1.0, lam=0.5)
    expected_adv, expected_ret = gae_advantages(REWARDS, VALUES, MASK, 1.0, 0.5)
    assert torch.equal(adv, expected_adv) and torch.equal(ret, expected_ret)
    assert ADVANTAGE_ESTIMATORS.names() == ["dr_grpo", "gae", "grpo", "reinforce++_baseline", "rloo"]


def test_group_advantages_vectorised_matches_naive_loop():
    torch.manual_seed(0)
    G, n_groups = 4, 3
    r = torch.randn(G * n_groups, dtype=torch.float64)
    out = group_advantages(r, G, eps=1e-6)
    out_dr = group_advantages(r, G, scale_by_std=False)
    for g in range(n_groups):
        vals = r[g * G : (g + 1) * G].tolist()
        mean, std = statistics.mean(vals), statistics.stdev(vals)  # stdev is the unbiased (n-1) one
        for i, x in enumerate(vals):
            assert out[g * G + i].item() == pytest.approx((x - mean) / (std + 1e-6), rel=1e-9)
            assert out_dr[g * G + i].item() == pytest.approx(x - mean, rel=1e-9, abs=1e-12)


def test_group_advantages_detached_and_float32():
    r = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    out = group_advantages(r, 2)
    assert out.dtype == torch.float32 and not out.requires_grad


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"\(5\).*\(2\)"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        group_advantages(torch.zeros(4), 1, scale_by_std=False)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="dr_grpo, gae, grpo, reinforce\\+\\+_baseline, rloo"):
        ADVANTAGE_ESTIMATORS.get("ppo")
