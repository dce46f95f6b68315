"""Whole parameters for generation: which strategies shard parameters, and that FSDP's are gathered from the
wrapped root, read-only. (Running FSDP or ZeRO-3 needs GPUs: `benchmarks/gpu_check.py`.)"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_rlhf.algorithms.sharding import full_parameters, sharding_kind


class _FSDP(FSDPStrategy):  # no process group or GPU needed to ask for the kind
    def __init__(self, model=None):
        self._model = model


class _DeepSpeed(DeepSpeedStrategy):
    def __init__(self, stage: int):
        self.config = {"zero_optimization": {"stage": stage}}


def test_only_fsdp_and_zero3_shard_parameters():
    assert sharding_kind(_FSDP()) == "fsdp"
    assert sharding_kind(_DeepSpeed(3)) == "zero3"
    assert sharding_kind(_DeepSpeed(2)) is None  # ZeRO-2 shards gradients and optimizer states only
    assert sharding_kind(DDPStrategy()) is None
    assert sharding_kind(SingleDeviceStrategy("cpu")) is None
    with full_parameters(None, torch.nn.Linear(2, 2)):  # no trainer: nothing to gather
        pass


def test_fsdp_gathers_from_the_wrapped_root_without_writeback(monkeypatch):
    from torch.distributed.fsdp import FullyShardedDataParallel

    calls = []

    @contextmanager
    def summon(module, writeback=True, recurse=True, **kw):
        calls.append(("enter", module, writeback, recurse))
        yield
        calls.append(("exit", module))

    monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", staticmethod(summon))
    root, policy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with full_parameters(_FSDP(root), policy):
        calls.append(("inside",))
    assert calls == [("enter", root, False, True), ("inside",), ("exit", root)]
