"""Checks a data module runs in `setup()` against the trainer and the stage it feeds, before any rollout or step.

- the run takes steps: `trainer.max_steps` is not 0 (nor `max_epochs` 0 when steps are unbounded);
- every directory the stage exports to (`stage.exports()`) can be written (`models.check_writable`), so a bad
  output dir fails now, not after training;
- RL prompts (`usable_prompts`): rows a rollout cannot use are dropped and counted in ONE warning that names the
  first of them (file:line) and the fix: a prompt longer than `rollout.max_prompt_length` tokens with its chat
  template (it would be cut from the left, losing the question's start), or a row a reward can never pay (the
  reward's `unscorable(row)` says why, e.g. `accuracy` with the answer "sixteen"). If no row is left, it is a
  DataError; so is a train set smaller than one step's batch (`check_batch_rows`: every batch would be dropped).

Simplifications: the stage is duck-typed (`exports`, `tokenizer`, `rollout_cfg`, `reward_fn`, `val_accuracy`);
a stage without one of them skips that check. A dataset is checked in one pass in memory. Dropping is the
counted-skip policy of verl's `filter_overlong_prompts`; there is no switch to refuse instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import datasets

from lightning_rlhf.data.sources import locate_row
from lightning_rlhf.errors import ConfigError, DataError, DataWarning

EXPORT_KEYS = ("model.init_args.output_dir", "model.init_args.critic.output_dir")  # in `exports()` order


def check_run(trainer: Any) -> None:
    """ConfigError when the trainer would take no step (and so write no model)."""
    if trainer.max_steps == 0:
        raise ConfigError("trainer.max_steps=0: the run would take no step and write no model; set max_steps >= 1 "
                          "(or -1 to train for max_epochs).")
    if trainer.max_steps == -1 and trainer.max_epochs == 0:
        raise ConfigError("trainer.max_epochs=0 with no max_steps: the run would take no step; set max_epochs >= 1 "
                          "or max_steps >= 1.")


def check_outputs(stage: Any) -> None:
    """NotWritableError for the first export directory of `stage` that cannot be written."""
    from lightning_rlhf.models import check_writable  # here: importing the data package stays light

    exports = getattr(stage, "exports", None)
    for i, (_, out) in enumerate(exports() if callable(exports) else []):
        if out is not None:
            check_writable(out, EXPORT_KEYS[i] if i < len(EXPORT_KEYS) else "an output dir of the stage")


def prompt_lengths(tokenizer: Any, prompts: Sequence[str], batch: int = 1000) -> list[int]:
    """Tokens of each prompt as a rollout encodes it (chat template, no special tokens added)."""
    from lightning_rlhf.models.chat import chat_prompts

    out: list[int] = []
    for i in range(0, len(prompts), batch):
        texts = chat_prompts(tokenizer, prompts[i : i + batch])
        out += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return out


def _reward_checks(stage: Any, val: bool) -> list[Callable[[dict], str | None]]:
    """The `unscorable(row)` checks of the stage's rewards (and, for validation, of its val accuracy reward)."""
    fns = list(getattr(getattr(stage, "reward_fn", None), "fns", {}).values())
    if val and getattr(stage, "val_accuracy", None) is not None:
        fns.append(stage.val_accuracy)
    return [fn.unscorable for fn in fns if callable(getattr(fn, "unscorable", None))]


def unusable_reasons(ds: datasets.Dataset, stage: Any, val: bool) -> list[str | None]:
    """Per row, why a rollout of `stage` cannot use it (None: usable)."""
    reasons: list[str | None] = [None] * len(ds)
    tokenizer, rollout = getattr(stage, "tokenizer", None), getattr(stage, "rollout_cfg", None)
    if tokenizer is not None and rollout is not None:
        limit = rollout.max_prompt_length
        for i, n in enumerate(prompt_lengths(tokenizer, ds["prompt"])):
            if n > limit:
                reasons[i] = (f"its prompt is {n} tokens with the chat template, over rollout.max_prompt_length="
                              f"{limit} (it would lose its start); raise max_prompt_length to {n} to keep such rows")
    checks = _reward_checks(stage, val)
    if checks:
        columns = ds.to_dict()
        for i in range(len(ds)):
            row = {k: v[i] for k, v in columns.items()}
            reasons[i] = reasons[i] or next((r for r in (check(row) for check in checks) if r), None)
    return reasons


def usable_prompts(ds: datasets.Dataset, source: Mapping[str, Any], what: str, stage: Any,
                   val: bool = False) -> datasets.Dataset:
    """`ds` without the rows `stage` cannot use, counted in one DataWarning; DataError when none is left."""
    reasons = unusable_reasons(ds, stage, val)
    bad = [i for i, r in enumerate(reasons) if r]
    if not bad:
        return ds
    first = f"{locate_row(source, bad[0])}: {reasons[bad[0]]}"
    if len(bad) == len(ds):
        raise DataError(f"{what}: none of its {len(ds)} rows can be used, e.g. {first}.")
    warnings.warn(f"{what}: dropped {len(bad)} of {len(ds)} rows, e.g. {first}.", DataWarning, stacklevel=2)
    return ds.select([i for i, r in enumerate(reasons) if not r])


def check_batch_rows(rows: int, batch_size: int, world_size: int, what: str) -> None:
    """DataError when a train set of `rows` cannot fill one step of `batch_size` prompts on each rank."""
    if rows < batch_size * world_size:
        ranks = f" x {world_size} ranks" if world_size > 1 else ""
        raise DataError(f"{what} has {rows} rows, fewer than one step's batch_size={batch_size}{ranks}: the last "
                        "incomplete batch is dropped, so nothing would be trained; lower data.init_args.batch_size or "
                        "add rows.")
