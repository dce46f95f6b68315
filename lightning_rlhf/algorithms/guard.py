"""The non-finite guard: an update whose loss or gradient holds a NaN or an infinity is skipped, not applied.

Every stage checks before each optimizer step (`Stage.guard`): the losses of the mini-batch, then the
gradients of the models it is about to step. A bad update is skipped (gradients dropped), counted in
`train/skipped_updates` (the run's total) and named in a warning (which loss, or which parameter's gradient).
After `max_in_a_row` skipped updates in a row the run stops with `TrainingDiverged`, a user error the command
line prints as one line; checkpoints already written stay as they are (the last good one resumes).

Simplified: the gradient check is one fused norm over all gradients (a parameter-by-parameter search runs only
when that norm is not finite, to name the tensor); under data parallel each rank checks what it holds and one
cross-rank "anything bad" flag makes every rank skip the same updates.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import torch
from torch import Tensor

from lightning_rlhf.errors import UserError


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite updates in a row: the run stops, its checkpoints kept."""


def first_nonfinite(losses: Mapping[str, Tensor | float], models: Mapping[str, torch.nn.Module]) -> str | None:
    """The name of the first non-finite loss, else of the first parameter with a non-finite gradient, else None."""
    for name, loss in losses.items():
        if not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            return name
    for prefix, model in models.items():
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).item()):
            continue
        for name, p in model.named_parameters():  # rare: find which tensor (the norm may just overflow)
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"{prefix} gradient of {name}"
    return None


class NonFiniteGuard:
    """Counts skipped updates; see the module docstring."""

    def __init__(self, max_in_a_row: int = 3) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_skipped_in_a_row={max_in_a_row}: must be >= 1 (1 stops at the first bad update)")
        self.max_in_a_row, self.skipped, self.in_a_row = max_in_a_row, 0, 0

    def should_skip(self, losses: Mapping[str, Tensor | float], models: Mapping[str, torch.nn.Module], step: int,
                    any_rank: Callable[[bool], bool] | None = None) -> bool:
        """True when this update must be skipped (counted and warned); raises after too many in a row. `step`: the
        step this update belongs to, counted from 1 (so `step=N.ckpt` holds the weights before step N + 1)."""
        bad = first_nonfinite(losses, models)
        if any_rank is not None and any_rank(bad is not None) and bad is None:
            bad = "a loss or gradient on another rank"
        if bad is None:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"{self.in_a_row} updates in a row had a non-finite value (the last at step {step}: {bad}); "
                f"stopping. Checkpoints written so far are kept: lower the learning rate or check the rewards and "
                f"data, then resume with --ckpt_path last")
        warnings.warn(f"step {step}: non-finite {bad}; update skipped ({self.in_a_row} in a row, "
                      f"{self.skipped} in this run)", RuntimeWarning, stacklevel=2)
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))
