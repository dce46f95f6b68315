"""Train / val / test splits by a stable hash, and `collect`, the sampling loop every task generator uses.

A question belongs to exactly one split, decided by a hash of its text (`split_of`), so held-out prompts
never appear in training whatever the seed or `n`. `collect` draws from a task's sampler until it has
`n` items of the wanted split. A leaf module (standard library only), shared by `tasks.py` and
`countdown.py`.

Simplifications: the hash is blake2b of the key, bucketed into 10,000; `holdout` is split half val, half
test; within a call keys are distinct until 20,000 draws in a row bring nothing new, after which repeats
are allowed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def split_of(key: str, holdout: float = 0.1) -> str:
    """'train', 'val' or 'test' for `key`, from a stable hash: `holdout` of keys are held out, half each."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000
    cut = int(round(holdout * 10_000))
    if bucket < cut // 2:
        return "test"
    if bucket < cut:
        return "val"
    return "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'. Use one of: {', '.join(SPLITS)}")
    return SPLITS[split]


def collect(n: int, split: str, sample: Callable[[], tuple[str, Any]], holdout: float, what: str) -> list[Any]:
    """Draw `sample()` -> (key, item) until `n` items whose key hashes into `split`; distinct keys first.

    When 20,000 draws in a row bring nothing new, repeats are allowed; if even that brings nothing, the
    split is empty for these settings and a ValueError says how to widen them.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what}: n must be a non-negative integer, got {n!r}")
    split = check_split(split)
    items: list[Any] = []
    seen: set[str] = set()
    misses, repeats_allowed = 0, False
    while len(items) < n:
        key, item = sample()
        if split_of(key, holdout) == split and (repeats_allowed or key not in seen):
            seen.add(key)
            items.append(item)
            misses = 0
            continue
        misses += 1
        if misses > 20_000:
            if repeats_allowed or not seen:
                raise ValueError(f"{what}: found no '{split}' problems with these settings after {misses} tries "
                                 f"({len(items)} of {n} made). Widen the ranges (more terms, larger numbers).")
            repeats_allowed, misses = True, 0
    return items
