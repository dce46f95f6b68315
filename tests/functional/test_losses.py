"""Aggregations, Bradley-Terry, PPO policy / value losses and the GRPO loss, worked by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.functional import (
    LOSS_AGGREGATIONS,
    aggregate,
    bradley_terry_loss,
    grpo_loss,
    policy_loss,
    value_loss,
)

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# ------------------------------------------------------------------------------------- aggregation

L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_aggregations_hand_example():
    # token-mean: (1 + 2 + 4) / 3 real tokens = 7/3
    assert_close(aggregate(L, M, "token-mean"), torch.tensor(7 / 3))
    # seq-mean-token-mean: row means (1+2)/2 = 1.5 and 4/1 = 4 -> (1.5 + 4) / 2 = 2.75
    assert_close(aggregate(L, M, "seq-mean-token-mean"), torch.tensor(2.75))
    # seq-mean-token-sum-norm: row sums 3 and 4, / T=3 -> 1 and 4/3 -> mean (1 + 4/3) / 2 = 7/6
    assert_close(aggregate(L, M, "seq-mean-token-sum-norm"), torch.tensor(7 / 6))
    # with max_len=4: 3/4 and 4/4 -> (0.75 + 1) / 2 = 0.875
    assert_close(aggregate(L, M, "seq-mean-token-sum-norm", max_len=4), torch.tensor(0.875))


def test_aggregations_with_an_empty_sequence():
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # token-mean: (1 + 2) / 2 = 1.5
    assert_close(aggregate(L, m, "token-mean"), torch.tensor(1.5))
    # seq-mean-token-mean: only row 0 has tokens -> 1.5 (row 1 left out, not counted as 0)
    assert_close(aggregate(L, m, "seq-mean-token-mean"), torch.tensor(1.5))
    # sum-norm divides by constants: (3/3 + 0/3) / 2 = 0.5
    assert_close(aggregate(L, m, "seq-mean-token-sum-norm"), torch.tensor(0.5))


@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_padding_changes_nothing(agg):
    garbage = L.clone()
    garbage[0, 2], garbage[1, 1], garbage[1, 2] = float("nan"), 1e30, -7.0
    assert_close(aggregate(garbage, M, agg), aggregate(L, M, agg))


def _naive_aggregate(loss, mask, agg, max_len=None):
    B, T = len(loss), len(loss[0])
    rows = [[x for x, m in zip(loss[b], mask[b]) if m] for b in range(B)]
    if agg == "token-mean":
        flat = [x for row in rows for x in row]
        return sum(flat) / len(flat)
    if agg == "seq-mean-token-mean":
        means = [sum(row) / len(row) for row in rows if row]
        return sum(means) / len(means)
    return sum(sum(row) / (max_len or T) for row in rows) / B


@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_matches_naive_loop(agg):
    torch.manual_seed(0)
    loss = torch.randn(4, 6, dtype=torch.float64)
    mask = (torch.rand(4, 6) < 0.6).double()
    mask[0, 0] = 1.0
    for max_len in (None, 9):
        got = aggregate(loss, mask, agg, max_len=max_len)
        assert got.item() == pytest.approx(_naive_aggregate(loss.tolist(), mask.tolist(), agg, max_len))


def test_aggregation_errors():
    with pytest.raises(ValueError, match="seq-mean-token-mean, seq-mean-token-sum-norm, token-mean"):
        aggregate(L, M, "sequence-mean")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(L, M, "seq-mean-token-sum-norm", max_len=0)
    assert LOSS_AGGREGATIONS.names() == sorted(AGGS)


# ---------------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_example():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # c - r = [1, -1]; -log sigmoid(1) = ln(1 + e^-1) = 0.313262 ; -log sigmoid(-1) = ln(1 + e) = 1.313262
    # loss = (0.313262 + 1.313262) / 2 = 0.813262 ; accuracy 1/2 ; mean margin (1 - 1) / 2 = 0
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert_close(loss, torch.tensor((math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2))
    assert_close(stats["accuracy"], torch.tensor(0.5))
    assert_close(stats["margin"], torch.tensor(0.0))


def test_bradley_terry_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # scalar margin 1: c - r - 1 = [0, -2] -> (ln 2 + ln(1 + e^2)) / 2 = (0.693147 + 2.126928) / 2
    loss, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    assert_close(loss, torch.tensor((math.log(2) + math.log(1 + math.exp(2))) / 2))
    # per-pair margin [1, 0]: [0, -1] -> (ln 2 + ln(1 + e)) / 2 = (0.693147 + 1.313262) / 2
    loss, stats = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert_close(loss, torch.tensor((math.log(2) + math.log(1 + math.e)) / 2))
    assert_close(stats["accuracy"], torch.tensor(0.5))  # accuracy ignores the margin


def test_bradley_terry_gradient_ties_and_detached_stats():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0], requires_grad=True)
    loss, stats = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d/dc mean(-log sigmoid(c - r)) = -(1 - sigmoid(c - r)) / B:
    #   pair 0: -(1 - sigmoid(1)) / 2 = -0.268941 / 2 = -0.134471 ; pair 1 (tie): -(1 - 0.5) / 2 = -0.25
    assert_close(chosen.grad, torch.tensor([-(1 - 1 / (1 + math.exp(-1))) / 2, -0.25]))
    assert_close(rejected.grad, -chosen.grad)
    assert_close(stats["accuracy"], torch.tensor(0.5))  # the tie counts as wrong
    assert all(not v.requires_grad for v in stats.values())


def test_bradley_terry_shape_error():
    with pytest.raises(ValueError, match="rejected"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


# ------------------------------------------------------------------------------------ policy loss

# ratios r = exp(logp - old_logp) with old_logp = 0: row 0 [1.5, 0.9, 0.5], row 1 [1.1, 0.5, (pad)]
RATIOS = torch.tensor([[1.5, 0.9, 0.5], [1.1, 0.5, 1.0]])
LOGP = RATIOS.log()
OLD = torch.zeros(2, 3)
ADV = torch.tensor([1.0, -2.0])  # one advantage per sequence
PMASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# per token, clip 0.2 -> clip(r) in [0.8, 1.2]; loss_t = max(-A r, -A clip(r)):
#   (0,0) A=1,  r=1.5: max(-1.5, -1.2) = -1.2   clipped term larger -> clipped, no gradient
#   (0,1) A=1,  r=0.9: max(-0.9, -0.9) = -0.9   equal -> not counted as clipped
#   (0,2) A=1,  r=0.5: max(-0.5, -0.8) = -0.5   unclipped larger
#   (1,0) A=-2, r=1.1: max( 2.2,  2.2) =  2.2   equal
#   (1,1) A=-2, r=0.5: max( 1.0,  1.6) =  1.6   clipped term larger -> clipped
# loss_mat = [[-1.2, -0.9, -0.5], [2.2, 1.6, pad]] ; real sum = -2.6 + 3.8 = 1.2 over 5 tokens
K3_OLD_NEW = [r - 1 - math.log(r) for r in (1.5, 0.9, 0.5, 1.1, 0.5)]
# = [0.094535, 0.005361, 0.193147, 0.004690, 0.193147], mean 0.098176


def test_policy_loss_hand_example_token_mean_and_stats():
    loss, stats = policy_loss(LOGP, OLD, ADV, PMASK)
    assert_close(loss, torch.tensor(1.2 / 5))  # 0.24
    assert_close(stats["clip_fraction"], torch.tensor(2 / 5))  # tokens (0,0) and (1,1)
    assert_close(stats["ratio_mean"], torch.tensor((1.5 + 0.9 + 0.5 + 1.1 + 0.5) / 5))  # 0.9
    assert_close(stats["approx_kl"], torch.tensor(sum(K3_OLD_NEW) / 5))
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_other_aggregations():
    # seq-mean-token-mean: row means -2.6/3 and 3.8/2 = 1.9 -> (-0.866667 + 1.9) / 2 = 0.516667
    loss, _ = policy_loss(LOGP, OLD, ADV, PMASK, agg="seq-mean-token-mean")
    assert_close(loss, torch.tensor((-2.6 / 3 + 1.9) / 2))
    # seq-mean-token-sum-norm: (-2.6/3 + 3.8/3) / 2 = 0.2 ; with max_len 4: (-2.6/4 + 3.8/4) / 2 = 0.15
    loss, _ = policy_loss(LOGP, OLD, ADV, PMASK, agg="seq-mean-token-sum-norm")
    assert_close(loss, torch.tensor(0.2))
    loss, _ = policy_loss(LOGP, OLD, ADV, PMASK, agg="seq-mean-token-sum-norm", max_len=4)
    assert_close(loss, torch.tensor(0.15))


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, OLD, ADV, PMASK)
    loss.backward()
    # d loss_t / d logp_t = -A r / 5 where the unclipped term wins (or ties), 0 where clipped:
    #   (0,0) clipped 0 ; (0,1) -1*0.9/5 = -0.18 ; (0,2) -1*0.5/5 = -0.1
    #   (1,0) 2*1.1/5 = 0.44 ; (1,1) clipped 0 ; (1,2) padding 0
    assert_close(logp.grad, torch.tensor([[0.0, -0.18, -0.1], [0.44, 0.0, 0.0]]))


def test_policy_loss_clip_higher():
    logp = torch.tensor([[math.log(1.25), math.log(1.5)]])
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])
    # symmetric 0.2: r=1.25 -> max(-1.25, -1.2) = -1.2 (clipped) ; r=1.5 -> -1.2 (clipped)
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2)
    assert_close(loss, torch.tensor(-1.2))
    assert_close(stats["clip_fraction"], torch.tensor(1.0))
    # clip_high 0.28 (DAPO): r=1.25 -> max(-1.25, -1.25) = -1.25 (not clipped) ; r=1.5 -> -1.28
    loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert_close(loss, torch.tensor((-1.25 - 1.28) / 2))
    assert_close(stats["clip_fraction"], torch.tensor(0.5))


def test_policy_loss_per_token_advantages_equal_broadcast():
    full = ADV.unsqueeze(-1).expand(2, 3).clone()
    for agg in AGGS:
        per_token, _ = policy_loss(LOGP, OLD, full, PMASK, agg=agg)
        per_seq, _ = policy_loss(LOGP, OLD, ADV, PMASK, agg=agg)
        assert_close(per_token, per_seq)


def test_policy_loss_padding_garbage_changes_nothing_and_grad_stays_finite():
    logp, old = LOGP.clone(), OLD.clone()
    logp[1, 2], old[1, 2] = 500.0, -500.0  # exp(1000) would be inf
    adv = ADV.unsqueeze(-1).expand(2, 3).clone()
    adv[1, 2] = float("nan")
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, PMASK)
    loss.backward()
    ref_loss, ref_stats = policy_loss(LOGP, OLD, ADV, PMASK)
    assert_close(loss, ref_loss)
    for k in ref_stats:
        assert_close(stats[k], ref_stats[k])
    assert torch.isfinite(logp.grad).all() and logp.grad[1, 2] == 0


def _naive_policy_loss_mat(logp, old, adv, mask, lo, hi):
    out = []
    for b in range(len(logp)):
        row = []
        for t in range(len(logp[0])):
            if not mask[b][t]:
                row.append(0.0)
                continue
            r = math.exp(logp[b][t] - old[b][t])
            a = adv[b][t]
            row.append(max(-a * r, -a * min(max(r, 1 - lo), 1 + hi)))
        out.append(row)
    return out


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_matches_naive_loop(agg):
    torch.manual_seed(0)
    B, T = 4, 6
    logp, old = -torch.rand(B, T, dtype=torch.float64) * 2, -torch.rand(B, T, dtype=torch.float64) * 2
    adv = torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) < 0.7).double()
    mask[:, 0] = 1.0
    mat = _naive_policy_loss_mat(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.3)
    expected = _naive_aggregate(mat, mask.tolist(), agg)
    got, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, agg=agg)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_policy_loss_errors():
    with pytest.raises(ValueError, match="token-mean"):
        policy_loss(LOGP, OLD, ADV, PMASK, agg="mean")
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(LOGP, OLD, torch.zeros(3), PMASK)
    with pytest.raises(ValueError, match="clip"):
        policy_loss(LOGP, OLD, ADV, PMASK, clip_low=-0.1)


# ------------------------------------------------------------------------------------- value loss

V = torch.tensor([[1.0, 0.5], [2.5, 7.0]])
V_OLD = torch.tensor([[0.5, 0.4], [2.1, -7.0]])
RET = torch.tensor([[1.2, 0.0], [1.0, 3.0]])
VMASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
# clip 0.2, per token:
#   (0,0) V=1.0, V_old=0.5 -> clip to [0.3, 0.7] = 0.7; (1.0-1.2)^2 = 0.04 vs (0.7-1.2)^2 = 0.25
#         -> max 0.25 (clipped term larger: counted, no gradient); 0.5*0.25 = 0.125
#   (0,1) V=0.5, V_old=0.4 -> [0.2, 0.6], V inside; both (0.5-0)^2 = 0.25 -> 0.125 (tie, not counted)
#   (1,0) V=2.5, V_old=2.1 -> [1.9, 2.3] = 2.3; (2.5-1)^2 = 2.25 vs (2.3-1)^2 = 1.69 -> 2.25; 1.125
# token-mean: (0.125 + 0.125 + 1.125) / 3 = 0.458333 ; clip_fraction 1/3


def test_value_loss_hand_example():
    loss, stats = value_loss(V, V_OLD, RET, VMASK, clip=0.2)
    assert_close(loss, torch.tensor(1.375 / 3))
    assert_close(stats["clip_fraction"], torch.tensor(1 / 3))
    assert not stats["clip_fraction"].requires_grad


def test_value_loss_no_clip_and_aggregations():
    # clip=None: 0.5 * (0.04 + 0.25 + 2.25) / 3 = 0.423333
    loss, stats = value_loss(V, V_OLD, RET, VMASK, clip=None)
    assert_close(loss, torch.tensor(0.5 * 2.54 / 3))
    assert_close(stats["clip_fraction"], torch.tensor(0.0))
    # seq-mean-token-mean (clip 0.2): row means (0.125 + 0.125)/2 = 0.125 and 1.125 -> 0.625
    loss, _ = value_loss(V, V_OLD, RET, VMASK, agg="seq-mean-token-mean")
    assert_close(loss, torch.tensor(0.625))
    # seq-mean-token-sum-norm: (0.25/2 + 1.125/2) / 2 = 0.34375
    loss, _ = value_loss(V, V_OLD, RET, VMASK, agg="seq-mean-token-sum-norm")
    assert_close(loss, torch.tensor(0.34375))


def test_value_loss_gradient_only_where_unclipped_term_wins():
    v = V.clone().requires_grad_(True)
    loss, _ = value_loss(v, V_OLD, RET, VMASK, clip=0.2)
    loss.backward()
    # d/dV 0.5 (V - R)^2 / 3 = (V - R) / 3 where the unclipped term wins (or ties):
    #   (0,0) clipped -> 0 ; (0,1) (0.5 - 0) / 3 = 0.166667 ; (1,0) (2.5 - 1) / 3 = 0.5 ; (1,1) pad 0
    assert_close(v.grad, torch.tensor([[0.0, 0.5 / 3], [0.5, 0.0]]))


def test_value_loss_padding_changes_nothing():
    v, old, ret = V.clone(), V_OLD.clone(), RET.clone()
    v[1, 1], old[1, 1], ret[1, 1] = float("nan"), 1e20, float("inf")
    assert_close(value_loss(v, old, ret, VMASK)[0], value_loss(V, V_OLD, RET, VMASK)[0])


def test_value_loss_errors():
    with pytest.raises(ValueError, match="token-mean"):
        value_loss(V, V_OLD, RET, VMASK, agg="tokens")
    with pytest.raises(ValueError, match="returns shape"):
        value_loss(V, V_OLD, RET[:, :1], VMASK)


# -------------------------------------------------------------------------------------- GRPO loss

# With ref_logp = 0: d = ref - logp = -ln r, k3 = e^d - d - 1 = 1/r + ln r - 1 per token:
K3_REF = [1 / r + math.log(r) - 1 for r in (1.5, 0.9, 0.5, 1.1, 0.5)]
# = [0.072132, 0.005751, 0.306853, 0.004401, 0.306853], sum 0.695989, mean 0.139198
REF = torch.zeros(2, 3)


def test_grpo_loss_hand_example():
    loss, stats = grpo_loss(LOGP, OLD, REF, ADV, PMASK, beta=0.1)
    # token-mean of (surrogate + 0.1 * k3) = 1.2/5 + 0.1 * 0.695989/5 = 0.24 + 0.0139198 = 0.2539198
    assert_close(loss, torch.tensor(1.2 / 5 + 0.1 * sum(K3_REF) / 5))
    assert_close(stats["kl"], torch.tensor(sum(K3_REF) / 5))
    assert_close(stats["policy_loss"], torch.tensor(0.24))
    assert_close(stats["clip_fraction"], torch.tensor(0.4))
    assert set(stats) >= {"clip_fraction", "approx_kl", "ratio_mean", "kl", "policy_loss"}
    assert all(not v.requires_grad for v in stats.values())


def test_grpo_loss_same_aggregation_for_the_sum():
    loss, _ = grpo_loss(LOGP, OLD, REF, ADV, PMASK, beta=0.1, agg="seq-mean-token-mean")
    # row 0: (-2.6 + 0.1 * (0.072132 + 0.005751 + 0.306853)) / 3 = -2.561526 / 3 = -0.853842
    # row 1: (3.8 + 0.1 * (0.004401 + 0.306853)) / 2 = 3.831125 / 2 = 1.915563 ; mean 0.530860
    row0 = (-2.6 + 0.1 * sum(K3_REF[:3])) / 3
    row1 = (3.8 + 0.1 * sum(K3_REF[3:])) / 2
    assert_close(loss, torch.tensor((row0 + row1) / 2))
    loss, _ = grpo_loss(LOGP, OLD, REF, ADV, PMASK, beta=0.1, agg="seq-mean-token-sum-norm", max_len=4)
    # ((-2.6 + 0.1*0.384736) / 4 + (3.8 + 0.1*0.311254) / 4) / 2
    assert_close(loss, torch.tensor((row0 * 3 / 4 + row1 * 2 / 4) / 2))  # row sums / 4, then mean


def test_grpo_loss_other_kl_kind():
    loss, stats = grpo_loss(LOGP, OLD, REF, ADV, PMASK, beta=0.1, kl_kind="k1")
    # k1 = -d = ln r: [ln 1.5, ln 0.9, ln 0.5, ln 1.1, ln 0.5] ; ln(1.5*0.9*0.5*1.1*0.5) = ln 0.37125
    assert_close(stats["kl"], torch.tensor(math.log(0.37125) / 5))
    assert_close(loss, torch.tensor(0.24 + 0.1 * math.log(0.37125) / 5))


def test_grpo_loss_without_kl_equals_policy_loss():
    for agg in AGGS:
        p_loss, _ = policy_loss(LOGP, OLD, ADV, PMASK, agg=agg)
        for ref, beta in ((None, 0.04), (REF, 0.0)):
            loss, stats = grpo_loss(LOGP, OLD, ref, ADV, PMASK, beta=beta, agg=agg)
            assert_close(loss, p_loss)
            assert_close(stats["kl"], torch.tensor(0.0))


def test_grpo_loss_gradient_on_clipped_token_is_kl_only():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, OLD, REF, ADV, PMASK, beta=0.1)
    loss.backward()
    # d/dlogp [0.1 * k3(ref - logp)] / 5 = 0.1 * (1 - e^d) / 5 = 0.1 * (1 - 1/r) / 5
    #   clipped (0,0), r=1.5: 0.1 * (1 - 2/3) / 5 = 0.0066667 (surrogate gives 0)
    #   unclipped (0,2), r=0.5: -1*0.5/5 + 0.1 * (1 - 2) / 5 = -0.1 - 0.02 = -0.12
    assert_close(logp.grad[0, 0], torch.tensor(0.1 * (1 - 1 / 1.5) / 5))
    assert_close(logp.grad[0, 2], torch.tensor(-0.12))
    assert logp.grad[1, 2] == 0


def test_grpo_loss_padding_garbage_changes_nothing():
    logp, ref = LOGP.clone(), REF.clone()
    logp[1, 2], ref[1, 2] = float("nan"), 1e4
    logp.requires_grad_(True)
    loss, stats = grpo_loss(logp, OLD, ref, ADV, PMASK, beta=0.1)
    loss.backward()
    ref_loss, ref_stats = grpo_loss(LOGP, OLD, REF, ADV, PMASK, beta=0.1)
    assert_close(loss, ref_loss)
    assert_close(stats["kl"], ref_stats["kl"])
    assert torch.isfinite(logp.grad).all()


def test_grpo_loss_errors():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo_loss(LOGP, OLD, REF, ADV, PMASK, kl_kind="k5")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo_loss(LOGP, OLD, None, ADV, PMASK, beta=0.0, kl_kind="k5")  # caught even with KL off
    with pytest.raises(ValueError, match="ref_logp shape"):
        grpo_loss(LOGP, OLD, REF[:, :2], ADV, PMASK)
    with pytest.raises(ValueError, match="token-mean"):
        grpo_loss(LOGP, OLD, REF, ADV, PMASK, agg="bad")
