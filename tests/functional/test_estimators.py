"""RLOO, REINFORCE++-baseline and the one-signature ADVANTAGE_ESTIMATORS entries, worked by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.functional import (
    ADVANTAGE_ESTIMATORS,
    grpo_loss,
    group_advantages,
    masked_whiten,
    outcome_rewards,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    token_level_rewards,
)
from lightning_rlhf.functional.advantages import ESTIMATOR_KEYWORDS

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two prompts, G = 3 samples each
# response lengths 3, 1, 1, 2, 1, 2 (right padding to T = 3)
MASK = torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
)


def test_outcome_rewards_hand_example():
    # each score on its row's last real token (index length - 1), 0 elsewhere; a row without tokens gets none
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    out = outcome_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    assert out.dtype == torch.float32 and not out.requires_grad
    # the same placement as token_level_rewards with no KL penalty
    lp = torch.randn(3, 3)
    assert torch.equal(out, token_level_rewards(torch.tensor([2.0, -1.0, 5.0]), lp, lp, mask, 0.0)[0])
    with pytest.raises(ValueError, match="scores"):
        outcome_rewards(torch.zeros(2), mask)


# -------------------------------------------------------------------------------------------- RLOO


def test_rloo_hand_example():
    # group [1, 0, 0]: leave-one-out baselines (0+0)/2 = 0, (1+0)/2 = 0.5, (1+0)/2 = 0.5
    #   A = [1 - 0, 0 - 0.5, 0 - 0.5] = [1, -0.5, -0.5]  (= 3/2 * (r - 1/3): [1, -0.5, -0.5])
    # group [1, 1, 1]: baselines all 1 -> A = 0
    expected = torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0])
    assert_close(rloo_advantages(SCORES, 3), expected)
    # equals G / (G - 1) * Dr. GRPO's r - mean
    assert_close(rloo_advantages(SCORES, 3), 1.5 * group_advantages(SCORES, 3, scale_by_std=False))


def test_rloo_registry_entry_broadcasts_over_real_tokens():
    adv, ret = ADVANTAGE_ESTIMATORS.get("rloo")(outcome_rewards(SCORES, MASK), MASK, group_size=3)
    # row 0: 1 on its 3 tokens; rows 1, 2: -0.5 on their 1 token; rows 3-5: 0; padding 0
    expected = torch.tensor(
        [[1.0, 1.0, 1.0], [-0.5, 0.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0] * 3]
    )
    assert_close(adv, expected)
    assert torch.equal(ret, adv)


def test_rloo_needs_groups_of_two():
    with pytest.raises(ValueError, match="RLOO.*num_generations >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="RLOO"):
        ADVANTAGE_ESTIMATORS.get("rloo")(torch.zeros(4, 2), torch.ones(4, 2))  # group_size defaults to 1


# ---------------------------------------------------------------------------- REINFORCE++-baseline


def test_reinforce_pp_baseline_hand_example():
    # group means 1/3 and 1 -> a = [2/3, -1/3, -1/3, 0, 0, 0]; broadcast over the real tokens:
    #   row 0: 3 tokens of 2/3, rows 1, 2: 1 token of -1/3 each, rows 3-5: 2 + 1 + 2 = 5 tokens of 0
    # n = 10 tokens; sum = 3*(2/3) - 2/3 = 4/3 -> mean = 2/15
    # sum of squares = 3*(4/9) + 2*(1/9) = 14/9
    # unbiased var = (14/9 - 10 * (2/15)^2) / 9 = (70/45 - 8/45) / 9 = 62/405; std = sqrt(62/405)
    # A = (a - 2/15) / std: 2/3 -> (8/15)/std, -1/3 -> (-7/15)/std, 0 -> (-2/15)/std
    std = math.sqrt(62 / 405)
    hi, lo, zero = (8 / 15) / std, (-7 / 15) / std, (-2 / 15) / std  # 1.3631, -1.1927, -0.3408
    expected = torch.tensor(
        [[hi, hi, hi], [lo, 0.0, 0.0], [lo, 0.0, 0.0], [zero, zero, 0.0], [zero, 0.0, 0.0], [zero, zero, 0.0]]
    )
    assert_close(reinforce_pp_baseline_advantages(SCORES, MASK, 3, eps=0.0), expected)
    assert_close(reinforce_pp_baseline_advantages(SCORES, MASK, 3), expected)  # eps = 1e-8 barely moves it
    adv, ret = ADVANTAGE_ESTIMATORS.get("reinforce++_baseline")(
        outcome_rewards(SCORES, MASK), MASK, group_size=3, eps=0.0
    )
    assert_close(adv, expected)
    assert torch.equal(ret, adv)


def test_reinforce_pp_baseline_is_whitened_group_centred_scores():
    torch.manual_seed(0)
    scores = torch.randn(8)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5, 2, 1])[:, None]).float()
    centred = group_advantages(scores, 4, scale_by_std=False)
    expected = masked_whiten(torch.where(mask > 0, centred[:, None], 0.0), mask)
    assert torch.equal(reinforce_pp_baseline_advantages(scores, mask, 4), expected)


def test_reinforce_pp_baseline_across_two_ranks_matches_one_process():
    torch.manual_seed(1)
    scores = torch.randn(8)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 1, 3, 2, 5, 4, 2, 6])[:, None]).float()
    whole = reinforce_pp_baseline_advantages(scores, mask, 2)
    halves = [(scores[:4], mask[:4]), (scores[4:], mask[4:])]  # whole groups on each "rank"
    local = []
    for s, m in halves:  # first pass records each rank's local statistics
        reinforce_pp_baseline_advantages(s, m, 2, all_reduce=lambda t: local.append(t) or t)
    summed = local[0] + local[1]
    for (s, m), rows in zip(halves, (slice(0, 4), slice(4, 8))):
        out = reinforce_pp_baseline_advantages(s, m, 2, all_reduce=lambda t: summed)
        assert_close(out, whole[rows], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ the one signature


def test_every_estimator_runs_with_the_same_keywords():
    rewards = outcome_rewards(SCORES, MASK)
    values = torch.full(MASK.shape, 0.25)
    kwargs = dict(group_size=3, values=values, gamma=1.0, lam=0.95, eps=1e-6, all_reduce=None)
    assert sorted(kwargs) == sorted(ESTIMATOR_KEYWORDS)
    for name in ADVANTAGE_ESTIMATORS:
        adv, ret = ADVANTAGE_ESTIMATORS.get(name)(rewards, MASK, **kwargs)
        assert adv.shape == ret.shape == MASK.shape, name
        assert adv.dtype == ret.dtype == torch.float32, name
        assert (adv[MASK == 0] == 0).all() and (ret[MASK == 0] == 0).all(), name
        kwargs64 = {**kwargs, "values": values.double()}
        adv64, _ = ADVANTAGE_ESTIMATORS.get(name)(rewards.double(), MASK, **kwargs64)
        assert adv64.dtype == torch.float64, name


def test_estimators_are_detached():
    rewards = outcome_rewards(SCORES, MASK).requires_grad_(True)
    values = torch.zeros(MASK.shape, requires_grad=True)
    for name in ADVANTAGE_ESTIMATORS:
        adv, ret = ADVANTAGE_ESTIMATORS.get(name)(rewards, MASK, group_size=3, values=values)
        assert not adv.requires_grad and not ret.requires_grad, name


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ConfigError, match="dr_grpo, gae, grpo, reinforce\\+\\+_baseline, rloo") as err:
        ADVANTAGE_ESTIMATORS.get("rlo")
    assert "unknown advantage estimator 'rlo'" in str(err.value)


def test_gae_entry_without_values_says_what_to_do():
    with pytest.raises(ValueError, match="needs values=.*critic-free estimator"):
        ADVANTAGE_ESTIMATORS.get("gae")(torch.zeros(2, 3), torch.ones(2, 3))


def test_outcome_entries_need_per_token_rewards():
    with pytest.raises(ValueError, match=r"per-token \(B, T\)"):
        ADVANTAGE_ESTIMATORS.get("grpo")(SCORES, torch.ones(6, 1), group_size=3)


def test_grpo_entry_is_bit_identical_to_todays_path():
    torch.manual_seed(0)
    G, B, T = 4, 12, 7
    lengths = torch.tensor([7, 1, 3, 5, 2, 7, 6, 4, 1, 2, 3, 7])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = torch.randn(B)
    scores[:G] = 1.0  # one group with zero std
    for name, scale in (("grpo", True), ("dr_grpo", False)):
        adv, _ = ADVANTAGE_ESTIMATORS.get(name)(outcome_rewards(scores, mask), mask, group_size=G, eps=1e-6)
        today = group_advantages(scores, G, scale, 1e-6)  # what the GRPO trainer computes
        assert torch.equal(adv, torch.where(mask > 0, today[:, None], 0.0)), name
        # and the loss sees exactly the same advantages as with the (B,) broadcast
        logp = torch.randn(B, T) * 0.1 - 1.0
        old, ref = logp + 0.05 * torch.randn(B, T), logp + 0.05 * torch.randn(B, T)
        assert torch.equal(grpo_loss(logp, old, ref, adv, mask)[0], grpo_loss(logp, old, ref, today, mask)[0])
