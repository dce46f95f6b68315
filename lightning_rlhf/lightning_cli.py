"""`RLHFCLI`: Lightning's `LightningCLI` for `fit/validate/test/predict`, with our run-directory rules.

Model and data are chosen by `class_path` (subclass mode); YAML may interpolate `${...}` (omegaconf
parser mode); several `--config` files compose, the last winning. Whatever loggers a recipe adds, every
run also writes `metrics.csv` and the resolved `config.yaml` into `trainer.default_root_dir`. A rerun in the
same directory first moves the previous run's files to `<root>/previous/<time>/`, so nothing is lost and
`SaveConfigCallback` never refuses. The command line itself (`main`, extra subcommands, user errors) is
in `cli.py`; this module knows nothing of it, so `commands.py` can run stages through `RLHFCLI`.

Simplifications: only global rank 0 archives; a `RunSummary` callback is added unless the config has one, and
for the RL stages a `SampleTable` (samples.jsonl every 10 steps) unless the config has one: add your own to
`trainer.callbacks` to change `every_n_steps` (0 turns it off).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

RUN_FILES = ("metrics.csv", "config.yaml", "hparams.yaml", "summary.json", "samples.jsonl")


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


def _with_csv_logger(logger: Any, root: str) -> list[Logger]:
    """Return the configured loggers with a CSVLogger writing `<root>/metrics.csv` first."""
    if logger is None or isinstance(logger, bool):
        loggers: list[Logger] = []
    elif isinstance(logger, (list, tuple)):
        loggers = list(logger)
    else:
        loggers = [logger]
    loggers = [lg for lg in loggers if not isinstance(lg, CSVLogger)]
    return [CSVLogger(save_dir=root, name="", version="")] + loggers


class RLHFCLI(LightningCLI):
    """LightningCLI with a guaranteed CSV log, archived reruns and our default callbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        from lightning_rlhf.algorithms.rl_stage import RLStage
        from lightning_rlhf.callbacks import RunSummary, SampleTable

        root = config.get("default_root_dir") or os.getcwd()
        config["default_root_dir"] = root
        if self.subcommand == "fit" and int(os.environ.get("LOCAL_RANK", "0")) == 0 and os.environ.get("NODE_RANK", "0") == "0":
            moved = archive_previous_run(root)
            if moved is not None:
                print(f"[lightning_rlhf] previous run's files in {root} moved to {moved}")
        config["logger"] = _with_csv_logger(config.get("logger"), root)
        callbacks, configured = list(callbacks), config.get("callbacks") or []
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        if not any(isinstance(c, RunSummary) for c in configured):
            callbacks.append(RunSummary())
        rl_stage = isinstance(getattr(self, "model", None), RLStage)
        if rl_stage and not any(isinstance(c, SampleTable) for c in configured):
            callbacks.append(SampleTable())
        return super()._instantiate_trainer(config, callbacks)
