"""Loggers. `WandbLogger` is Lightning's, but goes offline by itself when no API key is configured.

So `--config configs/logger/wandb.yaml` works on a laptop with no account: the run is written under
`<save_dir>/wandb/` and can be uploaded later with `wandb sync`. A fit resumed with `--ckpt_path` logs into
the run it continues (`continue_previous_run`: the same run id, wandb's resume="allow"), so its charts go on
instead of starting a second run.

Simplification: "configured" means WANDB_API_KEY is set or ~/.netrc names a wandb host; the key itself
is not checked. The previous run is the one wandb's `<save_dir>/wandb/latest-run` link points to.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _WandbLogger


def wandb_key_configured() -> bool:
    """True when WANDB_API_KEY is set or ~/.netrc holds credentials for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in h for h in hosts)


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger with `offline=None` meaning: offline unless an API key is configured."""

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_key_configured()
        super().__init__(*args, offline=offline, **kwargs)


def previous_run_id(save_dir: str | os.PathLike) -> str | None:
    """The id of the last wandb run written under `save_dir`: wandb links `wandb/latest-run` to its directory,
    which holds `run-<id>.wandb` (the directory's own name may carry a `-1` suffix when two runs start within
    one second). None when there is none."""
    link = Path(save_dir) / "wandb" / "latest-run"
    files = sorted(link.glob("run-*.wandb")) if link.is_dir() else []
    return files[0].name[len("run-"):-len(".wandb")] if files else None


def continue_previous_run(logger: _WandbLogger) -> str | None:
    """Before its run starts, point a wandb logger without an explicit id at the previous run in its save dir
    (a resumed fit). Returns the id it will log to (None: a new run)."""
    if logger._experiment is None and logger._id is None:
        run_id = previous_run_id(logger._save_dir or ".")
        if run_id is not None:
            logger._id = logger._wandb_init["id"] = run_id
            logger._wandb_init["resume"] = "allow"
    return logger._id
