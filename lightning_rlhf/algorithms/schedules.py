"""Learning-rate schedules by name: linear warmup, then constant, linear or cosine decay.

Kept by hand rather than transformers' `get_scheduler`: its warmup starts at lr 0 (step / warmup), so the
first update is wasted and every recorded figure would move; ours warms up as (step + 1) / warmup and is
otherwise the same closed form (cosine: 0.5 (1 + cos(pi progress)), linear: 1 - progress). It still is a
torch `LambdaLR`, stepped once per rollout step by the RL stages and per optimizer step by SFT and RM.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from lightning_rlhf.registry import Registry

LR_SCHEDULES = Registry("lr schedule")


@LR_SCHEDULES.register("constant")
def _constant(progress: float) -> float:
    return 1.0


@LR_SCHEDULES.register("linear")
def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


@LR_SCHEDULES.register("cosine")
def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_factor(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """step -> lr factor: (step + 1) / warmup during warmup, then the named decay of the remaining steps."""
    decay = LR_SCHEDULES.get(name)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay((step - warmup_steps) / max(1, total - warmup_steps))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A `LambdaLR` over `optimizer` following `schedule_factor(name, warmup_steps, total_steps)`."""
    return LambdaLR(optimizer, schedule_factor(name, warmup_steps, total_steps))
