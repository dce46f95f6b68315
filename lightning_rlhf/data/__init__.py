"""Data: task generators (arithmetic, countdown), source loading/validation, and LightningDataModules.

Data modules yield raw rows collated column-wise ({column: [values]}); the LightningModules tokenize.
The registries `TASKS` and `FORMATTERS` live in the leaf `registry.py`; importing this package imports
every module that registers into them (`tasks`, `countdown`, `sources`), so both are complete.
Simplification: the names are imported eagerly, so `lightning_rlhf.data` (even just its task
generators) loads `datasets` and `lightning` too.
"""

from lightning_rlhf.data.countdown import countdown_check, countdown_problems
from lightning_rlhf.data import place_value  # noqa: F401  (registers place_value, place_value_sft)
from lightning_rlhf.data import bilingual  # noqa: F401  (registers bilingual_arithmetic, bilingual_arithmetic_sft)
from lightning_rlhf.data.modules import PreferenceDataModule, PromptDataModule, SFTDataModule, collate_rows
from lightning_rlhf.data.registry import FORMATTERS, TASKS
from lightning_rlhf.data.sources import load_rows
from lightning_rlhf.data.tasks import arithmetic_problems, preference_pairs, sft_examples

__all__ = [
    "FORMATTERS",
    "TASKS",
    "PreferenceDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "arithmetic_problems",
    "collate_rows",
    "countdown_check",
    "countdown_problems",
    "load_rows",
    "preference_pairs",
    "sft_examples",
]
