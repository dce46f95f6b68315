"""Keep a frozen model's weights out of memory between uses, reading them back from its checkpoint file.

An RL stage's reference runs once per step, before the update. With `release_ref_pages: true` its weights
leave memory after that pass and are read back before the next one (`ReloadableWeights(model, source)`); a
reward model's do the same with its `release_weights: true` (`rewards/reward_model.py`):

    release()    every weight's storage is freed; the parameters stay, as empty tensors
    restore()    each weight is read from the safetensors file(s) into newly allocated memory
    resident()   a context: restored inside, released on exit

Read back into ordinary memory, the reference reuses what the last update freed and the allocator kept
(`keep_freed_memory`), instead of coming on top of it as the checkpoint's mapped pages do. SmolLM2-135M fp32
GRPO (benchmarks/RESULTS.md has the commands): peak RSS 4.10-4.20 GB with the weights resident, 3.82-3.95 GB
with them read back; the rest of the peak is the update's own (the policy, its gradients and AdamW states,
the activations) and what the allocator keeps. Reading 0.5 GB from the page cache costs about 0.1-0.2 s a step.

The first release() reads every weight from the file and compares it with the loaded one. If any differs (the
weights were changed after loading), is missing from the file (renamed keys, a GGUF or `.bin` checkpoint), or
the model is not on a CPU, nothing is ever released and one warning says why. A file that changes after that
check (another inode, size or modification time) is an error at the next restore(), never read.

The RL stages release a reference by default where it pays (`releases_by_default`: on a CPU, at least
AUTO_RELEASE_BYTES of weights); a weight that cannot be read back then keeps them in memory without a warning,
since nobody asked for the release.

Simplified: local directories with `model.safetensors` or a `model.safetensors.index.json` of shards; a weight
loaded in another dtype than the file's is converted back the same way; buffers stay in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_rlhf.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_entries(directory: str | Path) -> dict[str, _Entry]:
    """{tensor name: _Entry} of a checkpoint directory's safetensors file(s); {} when it has none."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        (["model.safetensors"] if (directory / "model.safetensors").is_file() else [])
    entries = {}
    for name in files:
        path = directory / name
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, meta in header.items():
            if key != "__metadata__" and meta["dtype"] in _DTYPES:
                entries[key] = _Entry(path, 8 + size + meta["data_offsets"][0], _DTYPES[meta["dtype"]],
                                      tuple(meta["shape"]))
    return entries


def _read_all(entries: dict[str, _Entry]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each entry, read into newly allocated memory with plain reads (no mapping of the
    file): each file opened once, its tensors read in file order."""
    by_file: dict[Path, list[tuple[str, _Entry]]] = {}
    for name, entry in entries.items():
        by_file.setdefault(entry.path, []).append((name, entry))
    for path, items in by_file.items():
        with open(path, "rb") as f:
            for name, entry in sorted(items, key=lambda item: item[1].start):
                out = torch.empty(entry.shape, dtype=entry.dtype)
                f.seek(entry.start)
                f.readinto(out.reshape(-1).view(torch.uint8).numpy())
                yield name, out


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


AUTO_RELEASE_BYTES = 64 * 2**20  # below this, the memory saved is too small to be worth a read per step


def releases_by_default(model: torch.nn.Module) -> bool:
    """Whether an RL stage releases `model` (its reference) between uses when `release_ref_pages` is not set:
    every weight on a CPU (on a GPU the reference lives in device memory, which this does not manage) and at
    least AUTO_RELEASE_BYTES of them (a 135M model in fp32: 0.54 GB, read back in about 0.1-0.2 s a step)."""
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" for p in params):
        return False
    return sum(p.numel() * p.element_size() for p in params) >= AUTO_RELEASE_BYTES


class CheckpointChanged(UserError, RuntimeError):
    """A released model's checkpoint file changed during the run: its weights cannot be read back. A user error,
    so it stops the run (a reward model's scorer would otherwise have its failures scored 0)."""


class ReloadableWeights:
    """A frozen model whose weights can leave memory and come back from its checkpoint; see the module
    docstring. `source`: the local directory the model was loaded from; `warn`: say with a warning (not an
    info line) why the weights must stay, for a release that was asked for."""

    def __init__(self, model: torch.nn.Module, source: str | Path, what: str = "the reference",
                 option: str = "release_ref_pages", warn: bool = True) -> None:
        self.params = dict(model.named_parameters())  # tied weights once, under their first name
        self.source = Path(source)
        self.what, self.option, self.warn = what, option, warn  # for messages: whose weights, which option
        self.entries: dict[str, _Entry] | None = None  # set by the first release() that finds them all equal
        self.stamps: dict[Path, tuple[int, int, int]] = {}  # (inode, size, mtime) of each file when checked
        self.checked = False
        self.released = False

    def _check(self) -> str | None:
        """Why the weights cannot be released (None when they can): read every one and compare."""
        devices = {p.device.type for p in self.params.values()}
        if devices != {"cpu"}:
            return f"the weights are on {sorted(devices)}, not only the CPU"
        entries = safetensors_entries(self.source) if self.source.is_dir() else {}
        if not entries:
            return f"'{self.source}' is not a local directory with model.safetensors (or its shard index)"
        for name, p in self.params.items():
            entry = entries.get(name)
            if entry is None or entry.shape != tuple(p.shape):
                return f"'{name}' is not in {self.source}'s safetensors files with shape {tuple(p.shape)}"
        for name, stored in _read_all({name: entries[name] for name in self.params}):
            if not torch.equal(stored.to(self.params[name].dtype), self.params[name].detach()):
                return f"'{name}' differs from its copy in {self.source} (changed after loading)"
        self.entries = entries
        self.stamps = {e.path: _stamp(e.path) for e in entries.values()}
        return None

    def release(self) -> int:
        """Free every weight's memory; returns the bytes freed (0 when the weights must stay, see the module
        docstring: the first call checks them, and warns once when they must stay)."""
        if not self.checked:
            self.checked = True
            with torch.no_grad():
                reason = self._check()
            if reason is not None:
                log.log(logging.WARNING if self.warn else logging.INFO, "%s: the weights of %s stay in memory: %s",
                        self.option, self.what, reason)
            else:
                mb = sum(p.numel() * p.element_size() for p in self.params.values()) / 2**20
                log.info("%s: %.0f MB of weights of %s leave memory between uses", self.option, mb, self.what)
        if self.entries is None or self.released:
            return 0
        freed = 0
        for p in self.params.values():
            freed += p.numel() * p.element_size()
            p.data = torch.empty(0, dtype=p.dtype)
        self.released = True
        return freed

    def restore(self) -> None:
        """Read every released weight back from the checkpoint (a no-op when they are in memory)."""
        if not self.released:
            return
        changed = [str(path) for path, stamp in self.stamps.items() if _stamp(path) != stamp]
        if changed:
            raise CheckpointChanged(f"{self.option}: {', '.join(changed)} changed since {self.what} was loaded "
                                    f"from it, so its weights cannot be read back; keep that checkpoint unchanged "
                                    f"during the run (write outputs elsewhere), or set {self.option}: false")
        for name, stored in _read_all({name: self.entries[name] for name in self.params}):
            self.params[name].data = stored.to(self.params[name].dtype)
        self.released = False

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """The weights in memory inside the block, released after it (where they can be)."""
        self.restore()
        try:
            yield
        finally:
            self.release()


class ReleasedReference:
    """An RL stage's `release_ref_pages`: whether its reference leaves memory between uses (`asked`; where None,
    `releases_by_default`), decided at the first question (a released model has no weights left to measure),
    and its `ReloadableWeights` from the first use on. `source`: the directory the reference was loaded from."""

    def __init__(self, asked: bool | None, source: str | Path) -> None:
        self.asked, self.source = asked, source
        self.decided: bool | None = None
        self.weights: ReloadableWeights | None = None

    def releases(self, ref: torch.nn.Module | None) -> bool:
        """Unasked, also only from a directory with safetensors files (not a GGUF file or a hub id), so that the
        plan printout does not promise a release that the first one's check would refuse."""
        if self.decided is None:
            if ref is None or self.asked is not None:
                self.decided = ref is not None and bool(self.asked)
            else:
                local = Path(self.source).is_dir() and bool(safetensors_entries(self.source))
                self.decided = local and releases_by_default(ref)
        return self.decided

    def resident(self, ref: torch.nn.Module | None, before_first=lambda: None) -> contextlib.AbstractContextManager:
        """The reference's weights in memory inside the block (see `ReloadableWeights.resident`); a no-op where it
        is not released. `before_first` runs once, before the first release."""
        if not self.releases(ref):
            return contextlib.nullcontext()
        if self.weights is None:
            before_first()
            self.weights = ReloadableWeights(ref, self.source, warn=self.asked is not None)
        return self.weights.resident()
