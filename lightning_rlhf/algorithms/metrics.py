"""Named weighted means for logging, reduced across ranks by torchmetrics.

`Means` keeps, per metric name, two `torchmetrics.SumMetric`s (float64 states, NaN kept): the sum of
value x weight and the sum of weights, created on first use on the device of the value. `compute()` returns
`{name: sum(value x weight) / sum(weight)}` in sorted name order, synchronised over all ranks when
torch.distributed is initialised (so every rank must update the same names), and resets. Used for
validation metrics, per-update training statistics and PPO's early-stop KL.

Why not `MeanMetric`: in torchmetrics 1.9 its `nan_strategy="disable"` replaces the weights by ones (an
unweighted mean), and every other strategy drops or replaces NaN, which would hide a broken metric.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import SumMetric


def _sum_metric(device: torch.device) -> SumMetric:
    metric = SumMetric(nan_strategy="disable").to(device)
    metric.set_dtype(torch.float64)
    return metric


class Means:
    """`update(name, value, weight)` then `compute()` -> {name: weighted mean over updates and ranks}."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[SumMetric, SumMetric]] = {}

    def update(self, name: str, value: Any, weight: Any = 1.0) -> None:
        """Add `value` (a number or tensor of values) with `weight` (broadcast to it) to metric `name`."""
        value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
        weight = torch.as_tensor(weight.detach() if isinstance(weight, torch.Tensor) else weight,
                                 dtype=torch.float64, device=value.device)
        if name not in self._sums:
            self._sums[name] = (_sum_metric(value.device), _sum_metric(value.device))
        total, count = self._sums[name]
        weight = torch.broadcast_to(weight, value.shape)
        total.update(value * weight)
        count.update(weight)

    def update_all(self, stats: dict[str, Any], weight: Any, prefix: str = "") -> None:
        """`update(prefix + key, value, weight)` for every entry of `stats`."""
        for key, value in stats.items():
            self.update(prefix + key, value, weight)

    def compute(self) -> dict[str, float]:
        """Weighted means (all ranks), in sorted name order; then forget everything."""
        out = {}
        for name in sorted(self._sums):
            total, count = (m.compute() for m in self._sums[name])
            out[name] = float(total / count) if float(count) > 0 else float("nan")
        self._sums.clear()
        return out

    def __bool__(self) -> bool:
        return bool(self._sums)
