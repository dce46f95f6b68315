"""Data: task generators (arithmetic, countdown), source loading/validation, and LightningDataModules.

Data modules yield raw rows collated column-wise ({column: [values]}); the LightningModules tokenize.
Names are imported lazily (PEP 562), so the task generators load without `datasets` or `lightning`.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "TASKS": "tasks", "arithmetic_problems": "tasks", "sft_examples": "tasks", "preference_pairs": "tasks",
    "countdown_problems": "countdown", "countdown_check": "countdown",
    "FORMATTERS": "sources", "load_rows": "sources",
    "collate_rows": "modules", "PromptDataModule": "modules", "SFTDataModule": "modules",
    "PreferenceDataModule": "modules",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lightning_rlhf.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"lightning_rlhf.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
