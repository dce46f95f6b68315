"""Whole parameters for generation under sharded strategies.

Sampling reads every weight of the policy many times per response (the static engine even reads them
directly, outside the module's forward), so under a strategy that shards parameters across ranks the weights
are gathered for the duration of a rollout, as verl and OpenRLHF do before handing weights to their engines:

  - FSDP (Lightning's `FSDPStrategy`): `FullyShardedDataParallel.summon_full_params` on the wrapped root,
    read-only (`writeback=False`);
  - DeepSpeed ZeRO stage 3: `deepspeed.zero.GatheredParameters` over the module's parameters, read-only;
  - anything else (one device, DDP, ZeRO 1/2, which shard only optimizer states and gradients): nothing.

Simplified: the whole model is gathered at once (peak memory = one full copy per rank, as in verl's
non-hybrid mode); no layer-by-layer gathering and no separate inference engine with resharded weights.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator


def sharding_kind(strategy: Any) -> str | None:
    """'fsdp', 'zero3' or None for a Lightning strategy (by class, so no import of an uninstalled library)."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "FSDPStrategy" in names:
        return "fsdp"
    if "DeepSpeedStrategy" in names and getattr(strategy, "zero_stage_3", False):
        return "zero3"
    return None


@contextmanager
def _fsdp_full(root: Any) -> Iterator[None]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
        yield


@contextmanager
def _zero3_full(module: Any) -> Iterator[None]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def full_parameters(strategy: Any, module: Any) -> ContextManager[None]:
    """A context in which `module`'s parameters are whole on this rank (see the module docstring)."""
    kind = None if strategy is None else sharding_kind(strategy)
    if kind == "fsdp":
        return _fsdp_full(strategy.model)
    if kind == "zero3":
        return _zero3_full(module)
    return nullcontext()
