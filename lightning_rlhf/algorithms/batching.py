"""Cutting a rollout into optimizer steps: `micro_batches` yields mini-batches (one optimizer step each) of
micro-batches (one backward each), with the loss weights that make the accumulated gradient that of the whole
mini-batch. Simplified: the order of each pass comes from torch's global generator (`torch.randperm`), which a
resumed run restores (`algorithms/resume.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from lightning_rlhf.rollout import Rollout


@dataclass
class MicroBatch:
    """Rows `idx` of a rollout (`part`), their loss weight in the mini-batch, and where they stand."""

    idx: Tensor
    part: Rollout
    weight: Tensor | float
    tokens: Tensor
    epoch: int
    ends_minibatch: bool
    ends_epoch: bool
    last: bool


def micro_batches(ro: Rollout, epochs: int, mini: int, micro: int, agg: str,
                  token_norm: Callable[[Tensor], Tensor] | None = None) -> Iterator[MicroBatch]:
    """`epochs` passes over `ro`, each in a fresh random order, cut into mini-batches of `mini` rows (one
    optimizer step each) and micro-batches of `micro` rows (one backward each). When both sizes hold whole
    groups, groups are shuffled as units, so the rows of one prompt stay in one micro-batch. A micro-batch's weight makes
    the accumulated gradient that of the whole mini-batch: its share of real tokens for token-mean, its
    share of rows for the per-sequence aggregations.

    `token_norm` maps this rank's mini-batch token count to the count token-mean divides by; data parallel
    passes (sum over ranks) / world size, so that after DDP averages the gradients over ranks the loss is the
    mean over the tokens of every rank's mini-batch, not a mean of per-rank means."""
    n, g = len(ro), ro.group_size
    whole_groups = g > 1 and mini % g == 0 and micro % g == 0
    for epoch in range(epochs):
        if whole_groups:  # shuffle groups, keep each together: its rows share one prompt forward
            order = torch.randperm(n // g, device=ro.response_ids.device)
            perm = (order[:, None] * g + torch.arange(g, device=order.device)).reshape(-1)
        else:
            perm = torch.randperm(n, device=ro.response_ids.device)
        batches = perm.split(mini)
        for k, mb_idx in enumerate(batches):
            mb_tokens = ro.response_mask[mb_idx].sum()
            mb_tokens = mb_tokens.clamp(min=1) if token_norm is None else token_norm(mb_tokens)
            parts = mb_idx.split(micro)
            for j, idx in enumerate(parts):
                part = ro.select(idx, g if whole_groups else 1)  # whole groups: one prompt forward per group
                tokens = part.response_mask.sum()
                weight = tokens / mb_tokens if agg == "token-mean" else len(idx) / len(mb_idx)
                end_mb = j == len(parts) - 1
                end_epoch = end_mb and k == len(batches) - 1
                yield MicroBatch(idx, part, weight, tokens, epoch, end_mb, end_epoch, end_epoch and epoch == epochs - 1)
