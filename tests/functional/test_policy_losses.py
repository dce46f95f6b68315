"""POLICY_LOSSES entries ("grpo", "ppo_clip"): hand-worked (2, 3) examples, bit-identity with today."""

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.functional import POLICY_LOSSES, aggregate, grpo_loss, policy_loss

# A (2, 3) batch: row 0 has 2 real tokens, row 1 has 3.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
RATIO = torch.tensor([[1.5, 0.7, 1.0], [1.1, 0.5, 1.3]])
OLD = torch.full((2, 3), -1.0)
LOGP = OLD + RATIO.log()  # so exp(logp - old_logp) = RATIO
ADV = torch.tensor([1.0, -2.0])  # one advantage per sequence
LN2 = math.log(2.0)
D = torch.tensor([[LN2, 0.0, 0.0], [0.0, LN2, 0.0]])  # d = ref_logp - logp
REF = LOGP + D
ENTROPY = torch.tensor([[0.5, 1.0, 9.0], [2.0, 0.5, 0.5]])  # 9.0 sits on padding

# Shared by both hand examples, clip_low = 0.2, clip_high = 0.28 -> clip range [0.8, 1.28]:
#   loss_t = max(-A * ratio, -A * clip(ratio))
#   row 0, A = +1: ratio 1.5 -> max(-1.5, -1.28) = -1.28 (clipped); ratio 0.7 -> max(-0.7, -0.8) = -0.7
#   row 1, A = -2: ratio 1.1 -> max(2.2, 2.2) = 2.2;  ratio 0.5 -> max(1.0, 1.6) = 1.6 (clipped);
#                  ratio 1.3 -> max(2.6, 2.56) = 2.6
#   loss matrix [[-1.28, -0.7, pad], [2.2, 1.6, 2.6]]; clip_fraction = 2 clipped / 5 real tokens = 0.4


def test_grpo_entry_hand_example_seq_mean_token_mean():
    # seq-mean-token-mean of the surrogate: row means (-1.28 - 0.7)/2 = -0.99 and 6.4/3 = 2.133333
    #   -> (-0.99 + 2.133333) / 2 = 0.571667
    # k3 = exp(d) - d - 1: d = ln 2 -> 2 - 0.693147 - 1 = 0.306853; d = 0 -> 0
    #   row means 0.306853/2 = 0.153426 and 0.306853/3 = 0.102284 -> 0.127855; * beta 0.1 = 0.0127855
    #   grpo_loss aggregates (surrogate + beta kl) per token; the aggregation is linear, so it adds up
    # entropy, seq-mean-token-mean: (0.5 + 1)/2 = 0.75 and (2 + 0.5 + 0.5)/3 = 1 -> 0.875; * 0.1 = 0.0875
    # loss = 0.571667 + 0.0127855 - 0.0875 = 0.496952
    k3 = 2.0 - LN2 - 1.0
    surrogate = (-0.99 + 6.4 / 3) / 2
    kl = (k3 / 2 + k3 / 3) / 2
    loss, st = POLICY_LOSSES.get("grpo")(
        LOGP, OLD, ADV, MASK, ref_logp=REF, entropy=ENTROPY, clip_low=0.2, clip_high=0.28,
        agg="seq-mean-token-mean", beta=0.1, kl_kind="k3", ent_coef=0.1,
    )
    assert_close(loss, torch.tensor(surrogate + 0.1 * kl - 0.1 * 0.875))
    assert_close(loss, torch.tensor(0.496952), atol=1e-6, rtol=0)
    assert_close(st["policy_loss"], torch.tensor(surrogate))
    assert_close(st["clip_fraction"], torch.tensor(0.4))
    assert_close(st["kl"], torch.tensor(2 * k3 / 5))  # the kl stat is the token mean: (k3 + k3) / 5
    assert_close(st["entropy"], torch.tensor(0.875))


def test_ppo_clip_entry_hand_example_token_mean_with_k1_kl():
    # token-mean of the surrogate: (-1.28 - 0.7 + 2.2 + 1.6 + 2.6) / 5 = 4.42 / 5 = 0.884
    # entropy token-mean: (0.5 + 1 + 2 + 0.5 + 0.5) / 5 = 0.9; * ent_coef 0.1 = 0.09
    # k1 = -d: [[-ln2, 0], [0, -ln2, 0]] -> token-mean -2 ln2 / 5 = -0.277259; * beta 0.1 = -0.0277259
    # loss = 0.884 - 0.09 - 0.0277259 = 0.766274
    adv_bt = torch.tensor([[1.0, 1.0, 5.0], [-2.0, -2.0, -2.0]])  # (B, T) advantages; 5.0 on padding
    loss, st = POLICY_LOSSES.get("ppo_clip")(
        LOGP, OLD, adv_bt, MASK, ref_logp=REF, entropy=ENTROPY, clip_low=0.2, clip_high=0.28,
        beta=0.1, kl_kind="k1", ent_coef=0.1,
    )
    assert_close(loss, torch.tensor(0.884 - 0.09 - 0.1 * 2 * LN2 / 5))
    assert_close(loss, torch.tensor(0.766274), atol=1e-6, rtol=0)
    assert_close(st["policy_loss"], torch.tensor(0.884))
    assert_close(st["clip_fraction"], torch.tensor(0.4))
    assert_close(st["kl"], torch.tensor(-2 * LN2 / 5))
    assert_close(st["entropy"], torch.tensor(0.9))
    # without ref_logp (or with beta = 0) there is no KL term and the kl stat is 0
    loss0, st0 = POLICY_LOSSES.get("ppo_clip")(
        LOGP, OLD, adv_bt, MASK, entropy=ENTROPY, clip_low=0.2, clip_high=0.28, beta=0.1, ent_coef=0.1
    )
    assert_close(loss0, torch.tensor(0.884 - 0.09))
    assert st0["kl"].item() == 0.0


def _random_batch(seed):
    torch.manual_seed(seed)
    B, T = 6, 7
    mask = (torch.arange(T)[None, :] < torch.tensor([7, 1, 4, 6, 2, 5])[:, None]).float()
    logp = torch.randn(B, T) * 0.3 - 1.0
    old, ref = logp + 0.2 * torch.randn(B, T), logp + 0.3 * torch.randn(B, T)
    return logp, old, ref, mask, torch.randn(B), torch.rand(B, T) * 2


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_grpo_entry_bit_identical_to_grpo_loss(agg, with_entropy):
    logp, old, ref, mask, adv, ent = _random_batch(0)
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, agg=agg, kl_kind="k3", max_len=9)
    lp1, lp2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    expected, st_expected = grpo_loss(lp1, old, ref, adv, mask, **kw)
    got, st = POLICY_LOSSES.get("grpo")(
        lp2, old, adv, mask, ref_logp=ref, entropy=ent if with_entropy else None, ent_coef=0.0, **kw
    )
    assert torch.equal(got, expected)
    expected.backward()
    got.backward()
    assert torch.equal(lp1.grad, lp2.grad)
    for key, value in st_expected.items():
        assert torch.equal(st[key], value), key
    assert ("entropy" in st) == with_entropy


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_ppo_clip_entry_bit_identical_to_the_ppo_trainer(agg):
    logp, old, _, mask, _, ent = _random_batch(1)
    adv = torch.randn(mask.shape)
    lp1, lp2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    e1, e2 = ent.clone().requires_grad_(True), ent.clone().requires_grad_(True)
    # what the PPO trainer computes today
    surrogate, st_expected = policy_loss(lp1, old, adv, mask, clip_low=0.2, agg=agg, max_len=9)
    expected = surrogate - 0.01 * aggregate(e1, mask, agg, 9)
    got, st = POLICY_LOSSES.get("ppo_clip")(
        lp2, old, adv, mask, entropy=e2, clip_low=0.2, agg=agg, max_len=9, ent_coef=0.01
    )
    assert torch.equal(got, expected)
    expected.backward()
    got.backward()
    assert torch.equal(lp1.grad, lp2.grad) and torch.equal(e1.grad, e2.grad)
    for key, value in st_expected.items():
        assert torch.equal(st[key], value), key
    assert torch.equal(st["policy_loss"], surrogate.detach())
    # no entropy, no KL: exactly policy_loss
    plain, _ = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask, clip_low=0.2, agg=agg, max_len=9)
    assert torch.equal(plain, policy_loss(logp, old, adv, mask, clip_low=0.2, agg=agg, max_len=9)[0])


def test_entries_share_one_signature_and_stats():
    logp, old, ref, mask, adv, ent = _random_batch(2)
    expected_sig = None
    for name in POLICY_LOSSES:
        fn = POLICY_LOSSES.get(name)
        sig = str(inspect.signature(fn))
        assert expected_sig in (None, sig), name
        expected_sig = sig
        _, st = fn(logp, old, adv, mask, ref_logp=ref, entropy=ent, clip_low=0.2, clip_high=None,
                   agg="token-mean", max_len=None, beta=0.0, kl_kind="k3", ent_coef=0.0)
        assert {"policy_loss", "clip_fraction", "approx_kl", "kl", "entropy"} <= set(st), name
        assert all(v.dim() == 0 and not v.requires_grad for v in st.values()), name
        assert st["kl"].item() == 0.0, name  # beta = 0: no KL term
        with pytest.raises(TypeError):
            fn(logp, old, adv, mask, ent_coeff=0.1)  # a typo in a keyword is not silently ignored
        with pytest.raises(ValueError, match="k1, k2, k3"):
            fn(logp, old, adv, mask, kl_kind="k4")  # checked even when the KL term is off


def test_unknown_policy_loss_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown policy loss 'ppo'. Valid names: grpo, ppo_clip"):
        POLICY_LOSSES.get("ppo")
