"""`RankShareSampler`: under data parallel, each rank reads its share of the order ONE process would read.

One process with `batch_size` B x world W reads global batch k = order[k*B*W : (k+1)*B*W], where `order` is
epoch e's order of a `DataLoader(shuffle, generator=torch.Generator().manual_seed(seed))` iterated for the
(e+1)-th time (or 0..n-1 without shuffle). Rank r reads rows r*B .. r*B+B-1 of each global batch. So a run on
W ranks with B prompts each sees, step by step, the same prompts as one process with B*W: the data half of
"DDP equals one process" (the RL stages' keyed sampling and cross-rank token means are the other half).
Lightning's own DistributedSampler shuffles with another permutation (and always shuffles training data).

It subclasses `DistributedSampler` so Lightning keeps it (and calls `set_epoch` each epoch). `ResumableLoader`
is the train DataLoader that Lightning saves in checkpoints (its `state_dict`): the epoch and the batches of it
already trained on, read from the trainer's progress (the iterator itself runs one batch ahead); on resume
the sampler starts that epoch after those batches. Simplified: with
`drop_last=False` a last global batch smaller than B*W is padded from the start of the order, as
DistributedSampler pads, so its ranks hold equal counts (one process would see a smaller batch there).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler


def epoch_order(n: int, epoch: int, shuffle: bool, seed: int) -> list[int]:
    """The order one process's loader yields in epoch `epoch`: its generator draws a base seed, then a
    permutation, each time an epoch's iterator starts (torch's DataLoader + RandomSampler)."""
    if not shuffle:
        return list(range(n))
    loader = DataLoader(range(n), batch_size=max(n, 1), shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epoch + 1):
        order = [int(i) for batch in loader for i in batch]
    return order


def rank_share(order: list[int], batch_size: int, world: int, rank: int, drop_last: bool) -> list[int]:
    """Rows of `order` that rank `rank` of `world` reads with `batch_size` each (see the module docstring)."""
    per_step = batch_size * world
    steps, rest = divmod(len(order), per_step)
    mine = [i for k in range(steps) for i in order[k * per_step + rank * batch_size: k * per_step + (rank + 1) * batch_size]]
    if rest and not drop_last:
        tail = order[steps * per_step:]
        tail += order[: (-len(tail)) % world]  # pad to a multiple of the ranks, as DistributedSampler does
        share = len(tail) // world
        mine += tail[rank * share:(rank + 1) * share]
    return mine


class RankShareSampler(DistributedSampler):
    """Indices of this rank's share of one process's order (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool) -> None:  # no super().__init__: it needs a process group and a dataset
        self.n, self.batch_size, self.num_replicas, self.rank = n, batch_size, world, rank
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, rows of this rank's share already read)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.epoch, self.shuffle, self.seed)
        mine = rank_share(order, self.batch_size, self.num_replicas, self.rank, self.drop_last)
        if self.resume_at is not None:  # the first pass after a resume starts where the checkpoint stood
            epoch, skip = self.resume_at
            self.resume_at = None
            mine = mine[skip:] if epoch == self.epoch else mine
        return iter(mine)

    def __len__(self) -> int:
        return len(rank_share(list(range(self.n)), self.batch_size, self.num_replicas, self.rank, self.drop_last))


class ResumableLoader(DataLoader):
    """A DataLoader whose `state_dict` is the train position (epoch, batches trained on in it) given by
    `position()`, and whose `load_state_dict` makes its `RankShareSampler` skip those batches."""

    def __init__(self, *args, position=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        if self.position is None:
            return {}
        epoch, batches = self.position()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, RankShareSampler):
            self.sampler.resume_at = (state["epoch"], state["batches"] * self.batch_size)
