"""The mini/micro-batch iterator the RL stages share: every row once per epoch, weights that make the
accumulated gradient the mini-batch's, and the flags that say when to step and when a rollout ends."""

from __future__ import annotations

import pytest
import torch

from lightning_rlhf.algorithms.options import OptimOptions
from lightning_rlhf.algorithms.plan import NO_GRAD_LOGITS, check_batch_sizes, no_grad_rows
from lightning_rlhf.algorithms.rl_stage import micro_batches
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.rollout import Rollout


def _rollout(lengths: list[int], t: int = 4) -> Rollout:
    n = len(lengths)
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths])
    return Rollout(prompt_ids=torch.ones(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2),
                   response_ids=torch.ones(n, t, dtype=torch.long), response_mask=mask,
                   logprobs=torch.zeros(n, t), truncated=torch.zeros(n, dtype=torch.bool), group_size=1)


def test_token_mean_weights_sum_to_one_per_minibatch_and_flags():
    ro = _rollout([1, 2, 3, 4, 1, 2, 3, 4])
    torch.manual_seed(0)
    parts = list(micro_batches(ro, epochs=2, mini=4, micro=2, agg="token-mean"))
    # 2 epochs x 8 rows / 2 rows per micro-batch = 8 micro-batches; a step after every second one
    assert len(parts) == 8
    assert [p.ends_minibatch for p in parts] == [False, True] * 4
    assert [p.ends_epoch for p in parts] == [False, False, False, True] * 2
    assert [p.last for p in parts] == [False] * 7 + [True]
    for epoch in (0, 1):
        rows = torch.cat([p.idx for p in parts if p.epoch == epoch])
        assert sorted(rows.tolist()) == list(range(8))  # every row once per epoch
    for k in range(0, 8, 2):  # token-mean: each micro-batch weighs its share of the mini-batch's real tokens
        a, b = parts[k], parts[k + 1]
        total = float(a.tokens + b.tokens)
        assert float(a.weight) == pytest.approx(float(a.tokens) / total)
        assert float(a.weight + b.weight) == pytest.approx(1.0)


def test_sequence_aggregations_weigh_rows():
    ro = _rollout([1, 4, 4, 4])
    (a, b) = list(micro_batches(ro, epochs=1, mini=4, micro=2, agg="seq-mean-token-mean"))
    assert (a.weight, b.weight) == (0.5, 0.5)  # 2 of the mini-batch's 4 rows each, whatever their lengths


def test_batch_sizes_that_do_not_divide_are_named():
    assert check_batch_sizes(8, None, None) == (8, 8)
    with pytest.raises(ConfigError, match="mini_batch_size=3 does not divide the 8 responses"):
        check_batch_sizes(8, 3, None)
    with pytest.raises(ConfigError, match="micro_batch_size=3 does not divide mini_batch_size=4"):
        check_batch_sizes(8, 4, 3)


def test_no_grad_forwards_take_rows_by_the_size_of_their_logits():
    assert NO_GRAD_LOGITS == 2**26  # 67_108_864 elements, 256 MB in float32
    # SmolLM2: 32 responses of 33 logit positions x 49152 = 1_622_016 elements per row;
    # 67_108_864 // 1_622_016 = 41 rows fit, capped at the rollout's 32
    assert no_grad_rows(32, OptimOptions(micro_batch_size=4), 33, 49152) == 32
    # 1024-token responses: 50_331_648 elements per row -> 1 row fits; micro_batch_size 4 is the floor
    assert no_grad_rows(32, OptimOptions(micro_batch_size=4), 1024, 49152) == 4
    # 160 positions x 151_936 (a Qwen vocabulary) = 24_309_760 per row -> 2 rows, above micro-batches of 1
    assert no_grad_rows(64, OptimOptions(micro_batch_size=1), 160, 151_936) == 2
    # set explicitly, it wins; an unknown vocabulary keeps micro_batch_size (none: the whole rollout)
    assert no_grad_rows(32, OptimOptions(micro_batch_size=4, logprob_micro_batch_size=3), 33, 49152) == 3
    assert no_grad_rows(32, OptimOptions(micro_batch_size=4), 33, None) == 4
    assert no_grad_rows(32, OptimOptions(), 33, None) == 32


def test_groups_stay_together_when_the_batch_sizes_hold_whole_groups():
    ro = _rollout([1, 2, 3, 4] * 4)
    ro.group_size = 4  # rows 4i .. 4i+3 answer prompt i
    torch.manual_seed(0)
    parts = list(micro_batches(ro, epochs=1, mini=8, micro=4, agg="token-mean"))
    for p in parts:  # each micro-batch is one whole group, in order, so its rows share one prompt forward
        assert p.idx.tolist() == list(range(int(p.idx[0]), int(p.idx[0]) + 4)) and int(p.idx[0]) % 4 == 0
        assert p.part.group_size == 4
    assert sorted(torch.cat([p.idx for p in parts]).tolist()) == list(range(16))
    mixed = list(micro_batches(ro, epochs=1, mini=8, micro=2, agg="token-mean"))  # 2 does not hold a group
    assert sorted(torch.cat([p.idx for p in mixed]).tolist()) == list(range(16))
    assert all(p.part.group_size == 1 for p in mixed)
