"""Callbacks that kill the run for the resume tests: a real SIGKILL, no clean-up, no Python `finally`.

Importable by `class_path: kill_callbacks.KillAtStep` when the run is started through
`tests/helpers/fit_with_test_rewards.py` (its folder is on `sys.path`).
"""

from __future__ import annotations

import io
import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the process at the end of training step `step` (after its checkpoint, if one is due)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            for logger in trainer.loggers:  # what the run logged so far is on disk, as after a real crash
                logger.save()
            os.kill(os.getpid(), signal.SIGKILL)


class KillInSave(Callback):
    """SIGKILL the process half-way through writing its `nth` checkpoint file (torch.save patched)."""

    def __init__(self, nth: int) -> None:
        self.nth, self.calls = nth, 0

    def setup(self, trainer, pl_module, stage) -> None:
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            self.calls += 1
            if self.calls < self.nth or isinstance(f, (str, os.PathLike)):
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
