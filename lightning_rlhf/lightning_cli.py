"""`RLHFCLI`: Lightning's `LightningCLI` for `fit/validate/test/predict`, with our run-directory rules.

Model and data are chosen by `class_path` (subclass mode); YAML may interpolate `${...}` (omegaconf
parser mode); several `--config` files compose, the last winning. Whatever loggers a recipe adds, every
run also writes `metrics.csv` and the resolved `config.yaml` into `trainer.default_root_dir`. A rerun in the
same directory first moves the previous run's files to `<root>/previous/<time>/`, so nothing is lost and
`SaveConfigCallback` never refuses. The command line itself (`main`, extra subcommands, user errors) is
in `cli.py`; this module knows nothing of it, so `commands.py` can run stages through `RLHFCLI`.

Checkpoints (`callbacks/checkpoint.py`): unless `trainer.enable_checkpointing` is false, a `RunCheckpoint`
(every 50 steps and at the end, the newest 2 kept, in `<root>/checkpoints`) is added when the config has no
checkpoint callback, and files are written atomically (`AtomicCheckpointIO`). `fit --ckpt_path last` resumes
from the newest complete checkpoint there (a fresh start when there is none yet, so it can always be passed);
a resumed run keeps the run files in place and appends to them instead of archiving them, and a wandb logger
logs into the run it continues (`loggers.continue_previous_run`).

Simplifications: only global rank 0 archives; a `RunSummary` callback is added unless the config has one, and
for the RL stages a `SampleTable` (samples.jsonl every 10 steps) unless the config has one: add your own to
`trainer.callbacks` to change `every_n_steps` (0 turns it off).
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from lightning_rlhf.errors import MissingFileError
from lightning_rlhf.models.files import check_writable

RUN_FILES = ("metrics.csv", "config.yaml", "hparams.yaml", "summary.json", "samples.jsonl", "checkpoints")


def archive_previous_run(root: str | os.PathLike) -> Path | None:
    """Move the run files of an earlier run in `root` to `root/previous/<mtime>/`; return where they went."""
    root = Path(root)
    present = [root / f for f in RUN_FILES if (root / f).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in present)))
    dest = root / "previous" / stamp
    n = 1
    while dest.exists():
        dest = root / "previous" / f"{stamp}-{n}"
        n += 1
    dest.mkdir(parents=True)
    for p in present:
        shutil.move(str(p), str(dest / p.name))
    return dest


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing metrics.csv is continued (a resumed run), not deleted."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):  # its columns stay: new rows are written under them
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumedCSVLogger(CSVLogger):
    """CSVLogger that appends to the run's metrics.csv (see `_AppendingWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _with_csv_logger(logger: Any, root: str, resuming: bool = False) -> list[Logger]:
    """Return the configured loggers with a CSVLogger writing `<root>/metrics.csv` first (appending to it when
    `resuming`, when wandb loggers also continue their previous run)."""
    if logger is None or isinstance(logger, bool):
        loggers: list[Logger] = []
    elif isinstance(logger, (list, tuple)):
        loggers = list(logger)
    else:
        loggers = [logger]
    loggers = [lg for lg in loggers if not isinstance(lg, CSVLogger)]
    if resuming:
        from lightning.pytorch.loggers import WandbLogger

        from lightning_rlhf.loggers import continue_previous_run

        for lg in loggers:
            if isinstance(lg, WandbLogger):
                continue_previous_run(lg)
    return [(ResumedCSVLogger if resuming else CSVLogger)(save_dir=root, name="", version="")] + loggers


class RLHFCLI(LightningCLI):
    """LightningCLI with a guaranteed CSV log, archived reruns and our default callbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # exit_on_error=False: a bad key or value raises ArgumentError, which `cli.main` prints as one line
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+", "exit_on_error": False})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        from lightning_rlhf.algorithms.optim import as_list
        from lightning_rlhf.algorithms.rl_stage import RLStage
        from lightning_rlhf.callbacks import RunSummary, SampleTable

        root = config.get("default_root_dir") or os.getcwd()
        config["default_root_dir"] = root
        check_writable(root, "trainer.default_root_dir")  # before a logger tries to create it
        callbacks, configured = list(callbacks), as_list(config.get("callbacks"))
        if config.get("enable_checkpointing", True) is not False:
            add_checkpointing(config, callbacks, configured, root)
        resuming = self.subcommand == "fit" and self._resume_checkpoint(configured + callbacks, root)
        if self.subcommand == "fit" and not resuming and int(os.environ.get("LOCAL_RANK", "0")) == 0 \
                and os.environ.get("NODE_RANK", "0") == "0":
            moved = archive_previous_run(root)
            if moved is not None:
                print(f"[lightning_rlhf] previous run's files in {root} moved to {moved}")
        config["logger"] = _with_csv_logger(config.get("logger"), root, resuming)
        if not any(isinstance(c, RunSummary) for c in configured):
            callbacks.append(RunSummary())
        rl_stage = isinstance(getattr(self, "model", None), RLStage)
        if rl_stage and not any(isinstance(c, SampleTable) for c in configured):
            callbacks.append(SampleTable())
        return super()._instantiate_trainer(config, callbacks)

    def _resume_checkpoint(self, callbacks: list[Any], root: str) -> bool:
        """Whether `fit --ckpt_path` names a checkpoint to resume from: `last` with a complete checkpoint in
        the run's checkpoint directory, or an existing file (a missing one is an error naming it)."""
        from lightning_rlhf.callbacks.checkpoint import RunCheckpoint, step_checkpoints

        ckpt = (self.config.get(self.subcommand) or {}).get("ckpt_path")
        if not ckpt:
            return False
        if ckpt == "last":
            return any(step_checkpoints(c.directory(root)) for c in callbacks if isinstance(c, RunCheckpoint))
        if ckpt in ("best", "hpc") or "://" in str(ckpt):
            return True
        if not os.path.isfile(ckpt):
            raise MissingFileError(f"--ckpt_path {ckpt}: no such checkpoint file; pass a `step=N.ckpt` file from "
                                   f"<trainer.default_root_dir>/checkpoints, or `last` for the newest one there")
        return True


def add_checkpointing(config: dict[str, Any], callbacks: list[Callback], configured: list[Any], root: str) -> None:
    """A `RunCheckpoint` in `<root>/checkpoints` unless one is configured, and atomic writes unless a checkpoint
    IO plugin is configured or the strategy writes its own (DeepSpeed)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins import CheckpointIO

    from lightning_rlhf.algorithms.optim import as_list
    from lightning_rlhf.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint

    if not any(isinstance(c, ModelCheckpoint) for c in configured):
        callbacks.append(RunCheckpoint(dirpath=os.path.join(root, "checkpoints")))
    plugins = as_list(config.get("plugins"))
    if "deepspeed" not in str(config.get("strategy")).lower() and not any(isinstance(p, CheckpointIO) for p in plugins):
        config["plugins"] = plugins + [AtomicCheckpointIO()]
