"""`Means`: weighted means by name, as the stages log them (validation sums, token-weighted training stats)."""

from __future__ import annotations

import math

import torch

from lightning_rlhf.algorithms.metrics import Means


def test_weighted_mean_by_name():
    m = Means()
    m.update("a", 2.0, 3)            # 2 with weight 3
    m.update("a", torch.tensor(4.0), torch.tensor(1))
    m.update("b", [1.0, 0.0, 1.0])   # three values, weight 1 each
    # a = (2*3 + 4*1) / (3 + 1) = 10 / 4 = 2.5 (an unweighted mean would say 3.0); b = 2 / 3
    assert m.compute() == {"a": 2.5, "b": 2 / 3}
    assert m.compute() == {}  # compute resets


def test_token_weighted_loss_equals_sum_over_sum():
    # The SFT validation: per-batch loss sums 12009.165 over 1919 tokens and 10177.457 over 1630 tokens give
    # (12009.165 + 10177.457) / (1919 + 1630) = 22186.622 / 3549 = 6.25151...
    m = Means()
    for total, tokens in ((12009.165, 1919), (10177.457, 1630)):
        m.update("val/loss", torch.tensor(total, dtype=torch.float64) / tokens, tokens)
    assert math.isclose(m.compute()["val/loss"], 22186.622 / 3549, rel_tol=1e-12)


def test_nan_is_kept_not_dropped():
    m = Means()
    m.update("x", 1.0)
    m.update("x", float("nan"))
    assert math.isnan(m.compute()["x"])
