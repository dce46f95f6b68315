"""Writing directories safely: `check_writable` (can this path become a directory we write?) and
`write_dir_atomically` (fill a temporary sibling, then swap it in). A leaf module: `loading.py` and `lora.py`
both use it, and it imports nothing else of the package but its errors.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from lightning_rlhf.errors import NotWritableError

# model files of a previous export that are never carried over into a new one (they would mix with its weights)
_STALE = re.compile(r"\.(safetensors|bin|pt|gguf)$|\.index\.json$|^adapter_|^config\.json$")


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, or NotWritableError when it cannot be a directory this process writes: it is a file, an
    ancestor is a file, or the nearest existing ancestor is not writable. Nothing is created.

    Simplified: permission is `os.access`'s answer (root may write anywhere but on a read-only filesystem); a
    disk that fills up shows only when writing (`write_dir_atomically`).
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise NotWritableError(f"{what} '{path}' is a file, not a directory; pick another path or move the file away.")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotWritableError(f"{what} '{path}' cannot be created: '{probe}' is a file, not a directory; pick "
                               "another path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NotWritableError(f"{what} '{path}' cannot be written: no write permission in '{probe}'; pick a "
                               "writable path or fix the permission.")
    return p


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Fill a directory with `write(tmp)` in a temporary sibling `.<name>.partial-<pid>`, then swap it in place of
    `out_dir`, so `out_dir` is always either the previous directory or the complete new one. Files of the previous
    directory that the new one lacks are moved over afterwards (run logs, notes), except model files (weights,
    adapters, config.json: stale ones must not mix with the new model). A failed write removes the partial copy and
    leaves `out_dir` as it was; an OSError (a full disk, no permission) is raised as NotWritableError (one line).

    Simplified: the swap is two renames; a process killed between them leaves the previous directory at
    `.<name>.old-<pid>` beside it. A killed write leaves its `.partial-<pid>` sibling behind.
    """
    out = Path(out_dir)
    tmp, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("partial", "old"))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        if not isinstance(e, OSError):
            raise
        where = f" ({str(e.filename).replace(str(tmp), str(out))})" if e.filename else ""
        raise NotWritableError(f"could not write '{out}': {e.strerror or e}{where}. '{out}' is as it was before (no "
                               "partial copy is left); free some space or fix the permission, then run again.") from e
    if old.exists():
        for item in old.iterdir():
            if not (out / item.name).exists() and not _STALE.search(item.name):
                item.rename(out / item.name)
        shutil.rmtree(old, ignore_errors=True)
    return out
