"""LightningDataModules over `load_rows` sources: prompts (GRPO/PPO), SFT rows, preference pairs.

They yield RAW rows, collated column-wise by `collate_rows` into {column: [values]}; tokenizing is
the LightningModule's job (it owns the policy's tokenizer). Extra columns pass through untouched.

Under a trainer, `setup()` first runs the preflight checks of `preflight.py` once: a fit takes steps, the
stage's output dirs can be written, and (prompts) rows a rollout cannot use are dropped and counted.

Simplifications: data is loaded once per process in `setup()` and cached; the train loader shuffles with
a `torch.Generator` seeded by `seed`, epoch e reading the order of that loader's (e+1)-th pass; under data
parallel each rank reads its share of that same order (`samplers.RankShareSampler`), so W ranks of B rows
see what one process of B*W rows sees; no val source means no validation batches (`val_dataloader` returns []).
"""

from __future__ import annotations

from typing import Any, Sequence

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_rlhf.data.preflight import check_batch_rows, check_outputs, check_run, usable_prompts
from lightning_rlhf.data.samplers import RankShareSampler, ResumableLoader
from lightning_rlhf.data.sources import load_rows
from lightning_rlhf.errors import ConfigError


def collate_rows(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """[{"prompt": "a", "answer": "1"}, ...] -> {"prompt": ["a", ...], "answer": ["1", ...]} (first row's keys)."""
    if not rows:
        return {}
    return {key: [row[key] for row in rows] for key in rows[0]}


class _RowsDataModule(pl.LightningDataModule):
    """Shared typed `__init__`, loading and loaders; subclasses set REQUIRED (and DROP_LAST).

    LightningCLI reads the arguments from this `__init__`'s signature, which a subclass inherits unless
    it needs other defaults (PromptDataModule's batch_size).
    """

    REQUIRED: tuple[str, ...] = ()
    DROP_LAST = False  # RL stages need every step to have batch_size prompts (mini-batches must divide it)

    def __init__(self, train: dict, val: dict | None = None, batch_size: int = 16, val_batch_size: int = 32,
                 shuffle: bool = True, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # also collects a subclass __init__'s arguments (same names)
        if batch_size < 1 or val_batch_size < 1:
            raise ConfigError(f"{type(self).__name__}: batch_size and val_batch_size must be >= 1, got "
                              f"{batch_size} and {val_batch_size}")
        self.train_source, self.val_source = train, val
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.shuffle, self.seed, self.num_workers = shuffle, seed, num_workers
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self._checked_for: Any = None  # the trainer the preflight checks ran for

    def setup(self, stage: str | None = None) -> None:
        """Load (once) the train source and, if given, the val source; errors name the config key. Under a
        trainer, the preflight checks run once (see the module docstring)."""
        if self.train_dataset is None:
            self.train_dataset = load_rows(self.train_source, self.REQUIRED, what="data.init_args.train")
        if self.val_source is not None and self.val_dataset is None:
            self.val_dataset = load_rows(self.val_source, self.REQUIRED, what="data.init_args.val")
        trainer = self.trainer
        if trainer is not None and self._checked_for is not trainer:
            self._checked_for = trainer
            self.preflight(trainer)

    def preflight(self, trainer: Any) -> None:
        """Fail before any model work when a fit would take no step or cannot write its outputs."""
        if trainer.state.fn == "fit":
            check_run(trainer)
            check_outputs(trainer.lightning_module)

    def _loader(self, ds: datasets.Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                          collate_fn=collate_rows, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        world, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
        # this rank's share of the one-process order, by epoch (Lightning keeps it and calls set_epoch)
        sampler = RankShareSampler(len(self.train_dataset), self.batch_size, world, rank, self.shuffle, self.seed,
                                   self.DROP_LAST)
        # the loader draws its workers' base seed from this generator, as before, not from torch's global one;
        # checkpoints save where training stands in the epoch, and a resumed run starts there
        return ResumableLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler,
                               drop_last=self.DROP_LAST, collate_fn=collate_rows, num_workers=self.num_workers,
                               generator=torch.Generator().manual_seed(self.seed), position=self._train_position)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches of it trained on) from the trainer's progress, for the loader's checkpoint state."""
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, False)


class PromptDataModule(_RowsDataModule):
    """Prompts with reference answers for the RL stages (GRPO, PPO). Required columns: prompt, answer.

    Batches are {"prompt": [...], "answer": [...], ...extra columns}; `batch_size` is prompts per step. The
    last incomplete training batch of an epoch is dropped, so every rollout step has the same size.

        data:
          class_path: lightning_rlhf.data.PromptDataModule
          init_args:
            train: {task: arithmetic, n: 2000, seed: 0, split: train}
            val: {task: arithmetic, n: 64, split: val}
            batch_size: 8
    """

    REQUIRED = ("prompt", "answer")
    DROP_LAST = True

    def __init__(self, train: dict, val: dict | None = None, batch_size: int = 8, val_batch_size: int = 32,
                 shuffle: bool = True, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(train, val, batch_size, val_batch_size, shuffle, seed, num_workers)

    def preflight(self, trainer: Any) -> None:
        """Also drop (and count) the prompts the stage cannot use, and check one step's batch can be filled."""
        super().preflight(trainer)
        stage = trainer.lightning_module
        self.train_dataset = usable_prompts(self.train_dataset, self.train_source, "data.init_args.train", stage)
        if self.val_dataset is not None:
            self.val_dataset = usable_prompts(self.val_dataset, self.val_source, "data.init_args.val", stage, val=True)
        if trainer.state.fn == "fit":
            check_batch_rows(len(self.train_dataset), self.batch_size, trainer.world_size, "data.init_args.train")


class SFTDataModule(_RowsDataModule):
    """Prompt/completion rows for SFT. Required columns: prompt, completion (answer, if present, passes through).

        data:
          class_path: lightning_rlhf.data.SFTDataModule
          init_args:
            train: {task: arithmetic_sft, n: 3000}
            val: {task: arithmetic_sft, n: 64, split: val}
            batch_size: 16
    """

    REQUIRED = ("prompt", "completion")


class PreferenceDataModule(_RowsDataModule):
    """Preference pairs for the reward model. Required columns: prompt, chosen, rejected.

        data:
          class_path: lightning_rlhf.data.PreferenceDataModule
          init_args:
            train: {path: data/pairs.jsonl, columns: {prompt: question}}
            val: {task: arithmetic_pairs, n: 128, split: val}
            batch_size: 16
    """

    REQUIRED = ("prompt", "chosen", "rejected")
