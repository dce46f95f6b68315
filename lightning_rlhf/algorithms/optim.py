"""Optimizer stepping under manual optimization with `global_step` counting rollout steps.

Lightning 2.x advances `global_step` on every `step()` of a Lightning-wrapped optimizer, so a stage that
runs several minibatch updates (and, in PPO, a second optimizer) per rollout would make
`trainer.max_steps` count optimizer steps. `step(module, opt, count=...)` steps through the strategy
either way (precision plugins and strategies still see the step), but only a step with `count=True`
goes through the wrapper that advances `global_step`. Stages call it with `count=True` exactly once
per rollout step (the policy's last update of that rollout).
"""

from __future__ import annotations

from typing import Any


def _no_closure() -> None:
    return None


def step(module: Any, optimizer: Any, *, count: bool) -> None:
    """Step `optimizer` (a LightningOptimizer from `module.optimizers()`), advancing global_step iff `count`."""
    if count:
        optimizer.step()
    else:
        raw = getattr(optimizer, "optimizer", optimizer)
        module.trainer.strategy.optimizer_step(raw, closure=_no_closure, model=module)
    optimizer.zero_grad(set_to_none=True)


def as_list(x: Any) -> list[Any]:
    """`self.optimizers()` / `self.lr_schedulers()` return a single object or a list; always give a list."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
