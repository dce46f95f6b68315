"""Comparing two runs' logged metrics and weights (the DDP and resume tests)."""

from __future__ import annotations

from typing import Callable

import torch


def assert_runs_close(rows1: list[dict], rows2: list[dict], w1: dict[str, torch.Tensor], w2: dict[str, torch.Tensor],
                      keep: Callable[[str], bool], tol: float) -> None:
    """Row by row, the kept keys are the same and their values agree within `tol` (relative above 1); every
    weight agrees within `tol`."""
    assert len(rows1) == len(rows2), ([r.get("step") for r in rows1], [r.get("step") for r in rows2])
    for r1, r2 in zip(rows1, rows2):
        keys = [k for k in r1 if keep(k)]
        assert keys and keys == [k for k in r2 if keep(k)], (r1, r2)
        for k in keys:
            a, b = float(r1[k]), float(r2[k])
            assert abs(a - b) <= tol * max(1.0, abs(a)), (r1.get("step"), k, a, b)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=tol, rtol=0, msg=k)
