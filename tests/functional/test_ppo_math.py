"""PPO math worked by hand: per-token rewards (k1, k3), GAE on them, explained variance, adaptive KL."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.functional import adaptive_kl_coef, explained_variance, gae_advantages, token_level_rewards

# A 2 x 3 rollout: row 0 has 3 real tokens, row 1 has 2 (its last position is padding, filled with garbage).
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, 9.9]])
REF = torch.tensor([[-1.5, -0.5, -1.0], [-0.7, -1.0, 3.3]])
SCORES = torch.tensor([1.0, -2.0])
KL_COEF = 0.1
# d = ref - logp:  row 0 [-0.5, 0.0, 1.0]   row 1 [-0.5, 0.5, (pad)]


def test_token_level_rewards_k1_hand_example():
    rewards, kl = token_level_rewards(SCORES, LOGP, REF, MASK, KL_COEF, kl_kind="k1")
    # k1 = -d = logp - ref:  row 0 [0.5, 0, -1.0]   row 1 [0.5, -0.5, 0 (pad)]
    assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.5, -0.5, 0.0]]))
    # r = -0.1 * k1, plus the score on the last real token:
    #   row 0: [-0.05, 0, 0.1 + 1.0] = [-0.05, 0, 1.1]        (last real token t=2)
    #   row 1: [-0.05, 0.05 - 2.0, pad 0] = [-0.05, -1.95, 0] (last real token t=1)
    assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.1], [-0.05, -1.95, 0.0]]))


def test_token_level_rewards_k3_hand_example():
    rewards, kl = token_level_rewards(SCORES, LOGP, REF, MASK, KL_COEF, kl_kind="k3")
    # k3 = e^d - d - 1:  d=-0.5: 0.60653066 + 0.5 - 1 = 0.10653066;  d=0: 0;  d=1: e - 2 = 0.71828183;
    #                    d=0.5: 1.64872127 - 0.5 - 1 = 0.14872127
    k3 = torch.tensor([[0.10653066, 0.0, 0.71828183], [0.10653066, 0.14872127, 0.0]])
    assert_close(kl, k3)
    # row 0: [-0.010653066, 0, -0.071828183 + 1] ;  row 1: [-0.010653066, -0.014872127 - 2, 0]
    expected = torch.tensor([[-0.010653066, 0.0, 0.928171817], [-0.010653066, -2.014872127, 0.0]])
    assert_close(rewards, expected)


def test_gae_on_the_k1_rewards_hand_example():
    rewards, _ = token_level_rewards(SCORES, LOGP, REF, MASK, KL_COEF, kl_kind="k1")
    values = torch.tensor([[0.5, 0.4, 0.8], [0.2, -1.0, 7.0]])  # 7.0 sits on padding: ignored
    adv, ret = gae_advantages(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 0, rewards [-0.05, 0, 1.1], V [0.5, 0.4, 0.8], V = 0 after the last token; gamma*lam = 0.72
    #   t=2: delta = 1.1 + 0.9*0 - 0.8 = 0.3                A_2 = 0.3
    #   t=1: delta = 0 + 0.9*0.8 - 0.4 = 0.32               A_1 = 0.32 + 0.72*0.3 = 0.536
    #   t=0: delta = -0.05 + 0.9*0.4 - 0.5 = -0.19          A_0 = -0.19 + 0.72*0.536 = 0.19592
    #   returns = A + V = [0.69592, 0.936, 1.1]
    # row 1, rewards [-0.05, -1.95], V [0.2, -1.0]
    #   t=1: delta = -1.95 + 0 - (-1.0) = -0.95              A_1 = -0.95
    #   t=0: delta = -0.05 + 0.9*(-1.0) - 0.2 = -1.15        A_0 = -1.15 + 0.72*(-0.95) = -1.834
    #   returns = [-1.834 + 0.2, -0.95 - 1.0, 0] = [-1.634, -1.95, 0]
    assert_close(adv, torch.tensor([[0.19592, 0.536, 0.3], [-1.834, -0.95, 0.0]]))
    assert_close(ret, torch.tensor([[0.69592, 0.936, 1.1], [-1.634, -1.95, 0.0]]))


def test_token_level_rewards_row_without_tokens_and_shape_errors():
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rewards, kl = token_level_rewards(torch.tensor([3.0, 5.0]), torch.zeros(2, 2), torch.zeros(2, 2), mask, 1.0)
    # logp = ref: no KL; row 0 gets its score at t=0; row 1 has no real token, so its score has nowhere to go
    assert_close(rewards, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert_close(kl, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="scores must have shape"):
        token_level_rewards(torch.zeros(3), LOGP, REF, MASK, 0.1)


def test_explained_variance_hand_example():
    # real tokens: returns R = [1, 2, 3, 4], values V = [1, 2, 3, 2]; padding holds garbage (100)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    values = torch.tensor([[1.0, 2.0, -100.0], [3.0, 2.0, 100.0]])
    # Var[R]: mean 2.5, squared deviations 2.25, 0.25, 0.25, 2.25 -> 5 / 4 = 1.25
    # R - V = [0, 0, 0, 2]: mean 0.5, squared deviations 0.25, 0.25, 0.25, 2.25 -> 3 / 4 = 0.75
    # EV = 1 - 0.75 / 1.25 = 0.4
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.4))
    assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))  # a perfect critic
    const = torch.full_like(returns, 2.5)  # the mean of R: explains nothing
    assert_close(explained_variance(const, returns, mask), torch.tensor(0.0))
    assert math.isnan(float(explained_variance(values, torch.ones_like(returns), mask)))  # nothing to explain


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        # coef 0.1, target 6, horizon 10000, n_steps 100 -> n_steps / horizon = 0.01
        (6.6, 0.1 * (1 + 0.1 * 0.01)),   # e = 6.6/6 - 1 = 0.1                      -> 0.1001
        (5.4, 0.1 * (1 - 0.1 * 0.01)),   # e = 5.4/6 - 1 = -0.1                     -> 0.0999
        (6.0, 0.1),                      # e = 0: unchanged
        (12.0, 0.1 * (1 + 0.2 * 0.01)),  # e = 12/6 - 1 = 1, clipped to 0.2         -> 0.1002
        (0.0, 0.1 * (1 - 0.2 * 0.01)),   # e = 0/6 - 1 = -1, clipped to -0.2        -> 0.0998
    ],
)
def test_adaptive_kl_coef_hand_values(current_kl, expected):
    got = adaptive_kl_coef(0.1, current_kl, target=6.0, horizon=10000, n_steps=100)
    assert got == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_coef_accepts_tensors_and_rejects_bad_settings():
    # e = 9/6 - 1 = 0.5 -> 0.2; n_steps / horizon = 50/100 = 0.5 -> 0.2 * (1 + 0.2*0.5) = 0.22
    assert adaptive_kl_coef(torch.tensor(0.2), torch.tensor(9.0), 6.0, 100, 50) == pytest.approx(0.22)
    with pytest.raises(ValueError, match="kl_target"):
        adaptive_kl_coef(0.1, 1.0, target=0.0, horizon=100, n_steps=1)
    with pytest.raises(ValueError, match="kl_horizon"):
        adaptive_kl_coef(0.1, 1.0, target=1.0, horizon=0, n_steps=1)
