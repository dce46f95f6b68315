"""Loggers. `WandbLogger` is Lightning's, but goes offline by itself when no API key is configured.

So `--config configs/logger/wandb.yaml` works on a laptop with no account: the run is written under
`<save_dir>/wandb/` and can be uploaded later with `wandb sync`.

Simplification: "configured" means WANDB_API_KEY is set or ~/.netrc names a wandb host; the key itself
is not checked.
"""

from __future__ import annotations

import netrc
import os
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
