"""Checkpoints an RL run can resume from exactly: `RunCheckpoint` (when, and which to keep) and
`AtomicCheckpointIO` (how a file is written).

`RunCheckpoint` saves `<root>/checkpoints/step=N.ckpt` every `every_n_steps` rollout (or optimizer) steps and
at the end of fit, and keeps the newest `keep_last`, removing an older one only after the newer one is whole
on disk. `--ckpt_path last` resumes from the highest complete step. What goes in a checkpoint: Lightning's
(weights of the trained models, optimizers, LR schedulers, loop progress, the train loader's position:
`data/samplers.py`) plus the stage's (`algorithms/resume.py`: RNG states, the adaptive KL coefficient,
validation history, the reference model's identity instead of its weights).

On resume, rows of `metrics.csv` and `samples.jsonl` logged after the checkpoint's step (by the killed run)
are dropped, so the files read as one uninterrupted run.

`AtomicCheckpointIO` writes `<file>.tmp-<pid>` beside the target, fsyncs it and renames it into place
(`os.replace`, atomic on one filesystem), so a kill during a save leaves the previous file whole; leftover
temporary files are removed at the next start. A full disk is reported as a user error naming the file.
Simplified: only global rank 0 writes (Lightning's rule for single-file checkpoints); sharded DeepSpeed
checkpoints are directories written by DeepSpeed itself, not through this IO.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_rlhf.errors import ConfigError, UserError

STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, no permission); earlier checkpoints are untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, then rename over it (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            raise CheckpointWriteError(f"could not write checkpoint {path}: {why}; the earlier checkpoints in "
                                       f"{path.parent} are untouched (free space or set trainer.callbacks' "
                                       "RunCheckpoint dirpath elsewhere)") from e
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete `step=N.ckpt` files in `directory`, by step (temporaries excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def drop_rows_after(root: Path, global_step: int) -> None:
    """Remove the rows a killed run logged after its checkpoint at `global_step` from `root/metrics.csv` and
    `root/samples.jsonl` (rewritten atomically). Lightning logs what happens during step g (its training
    metrics, the validation after it) at step g - 1, so rows from `global_step` on are dropped."""
    metrics = root / "metrics.csv"
    if metrics.exists():
        with open(metrics, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < global_step]
        if fields and len(kept) != len(rows):
            tmp = metrics.with_name(metrics.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(tmp, metrics)
    samples = root / "samples.jsonl"
    if samples.exists():
        lines = samples.read_text().splitlines(keepends=True)
        kept_lines = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) < global_step]
        if len(kept_lines) != len(lines):
            tmp = samples.with_name(samples.name + ".tmp")
            tmp.write_text("".join(kept_lines))
            os.replace(tmp, samples)


class RunCheckpoint(ModelCheckpoint):
    """Save every `every_n_steps` steps and at the end; keep the newest `keep_last` (module docstring).

    Args:
        every_n_steps: steps between saves (rollout steps in GRPO/PPO, optimizer steps in SFT/RM); 0: only
            at the end.
        keep_last: how many of the newest checkpoints to keep (at least 1).
        dirpath: where `step=N.ckpt` files go (default `<trainer.default_root_dir>/checkpoints`).
        save_at_end: also save when fit ends (if that step was not saved already).
    """

    def __init__(self, every_n_steps: int = 50, keep_last: int = 2, dirpath: str | None = None,
                 save_at_end: bool = True) -> None:
        if keep_last < 1:
            raise ConfigError(f"RunCheckpoint: keep_last={keep_last}; keep at least 1 checkpoint (resume needs one)")
        if every_n_steps < 0:
            raise ConfigError(f"RunCheckpoint: every_n_steps={every_n_steps}; use 0 to save only at the end")
        super().__init__(dirpath=dirpath, filename="step={step}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps or None, every_n_epochs=0, save_top_k=-1,
                         save_last=False, save_on_train_epoch_end=False, enable_version_counter=False)
        self.every_n_steps, self.keep_last, self.save_at_end = every_n_steps, keep_last, save_at_end

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for p in Path(self.dirpath).glob("*.ckpt.tmp-*"):  # a save killed half-way
                p.unlink(missing_ok=True)

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:  # the new file is whole on disk: drop the oldest beyond keep_last
            for _, old in step_checkpoints(self.dirpath)[: -self.keep_last]:
                if os.path.normpath(old) != os.path.normpath(filepath):
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("RunCheckpoint")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Save after every `every_n_steps`-th step: the state after its update, which a resumed run continues
        from (Lightning's own manual-optimization branch would warn that no pre-update state was kept)."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_checkpoint(trainer, self.format_checkpoint_name({"step": step}))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_at_end and trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_checkpoint(trainer, self.format_checkpoint_name({"step": trainer.global_step}))

    def directory(self, root: str | os.PathLike) -> str:
        """Where this callback's files go for a run rooted at `root` (its `dirpath`, else `<root>/checkpoints`)."""
        return self.dirpath or os.path.join(root, "checkpoints")

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        found = step_checkpoints(self.directory(trainer.default_root_dir))
        return {os.path.normpath(found[-1][1])} if found else set()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            drop_rows_after(Path(trainer.default_root_dir), int(checkpoint.get("global_step", 0)))
