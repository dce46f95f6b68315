"""RankShareSampler: W ranks of B rows read, step by step, what one process of B*W rows reads."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lightning_rlhf.data.samplers import RankShareSampler, epoch_order, rank_share


def test_rank_share_cuts_each_global_batch_into_rank_blocks():
    # order 0..9, B=2 per rank, W=2: global batches [0 1 2 3] [4 5 6 7], rest [8 9]
    assert rank_share(list(range(10)), 2, 2, 0, drop_last=True) == [0, 1, 4, 5]
    assert rank_share(list(range(10)), 2, 2, 1, drop_last=True) == [2, 3, 6, 7]
    # without drop_last the rest [8 9] is split evenly: rank 0 gets 8, rank 1 gets 9
    assert rank_share(list(range(10)), 2, 2, 0, drop_last=False) == [0, 1, 4, 5, 8]
    assert rank_share(list(range(10)), 2, 2, 1, drop_last=False) == [2, 3, 6, 7, 9]
    # a rest of 3 over 2 ranks is padded with the first row of the order: [8 9 10 0] -> [8 9] and [10 0]
    assert rank_share(list(range(11)), 2, 2, 1, drop_last=False) == [2, 3, 6, 7, 10, 0]


def test_epoch_order_is_what_one_process_loader_yields_each_epoch():
    loader = DataLoader(range(23), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    for epoch in range(3):  # the loader's generator moves on every epoch; epoch_order replays it
        assert [int(i) for b in loader for i in b] == epoch_order(23, epoch, shuffle=True, seed=3)
    assert epoch_order(5, 2, shuffle=False, seed=3) == [0, 1, 2, 3, 4]


def test_two_ranks_read_the_one_process_batches():
    n, b, world = 40, 4, 2
    one = DataLoader(range(n), batch_size=b * world, shuffle=True, generator=torch.Generator().manual_seed(0),
                     drop_last=True)
    ranks = [RankShareSampler(n, b, world, r, shuffle=True, seed=0, drop_last=True) for r in range(world)]
    for epoch in range(2):
        for s in ranks:
            s.set_epoch(epoch)
        shares = [DataLoader(range(n), batch_size=b, sampler=s, drop_last=True) for s in ranks]
        for big, *small in zip(one, *shares):
            assert sorted(big.tolist()) == sorted(i for part in small for i in part.tolist())
        assert len(ranks[0]) == n // world
