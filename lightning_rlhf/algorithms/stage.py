"""`Stage`: the LightningModule base every stage shares (SFT, reward model, GRPO, PPO).

It owns the parts that are the same in all four:
  - validation: before the first update (logged at step 0) and at every validation check, each batch
    adding its values to `self.val_metrics` (`Means`, reduced across ranks), the result appended to
    `eval_history`, which the run summary reads;
  - the optimizer, built from the injected `optimizer` callable (any `torch.optim` class in YAML), with
    the LR schedule of `lr_schedule()` over the run's optimizer steps;
  - export of the trained model(s) as HF-format directories at the end of fit (global rank 0); with `lora`
    (`models/lora.py`) the adapters merged into a plain HF directory, or PEFT's adapter directory.
  - the non-finite guard (`algorithms/guard.py`): an update with a NaN/inf loss or gradient is skipped and
    counted (train/skipped_updates); `max_skipped_in_a_row` of them stop the run;
  - checkpoints that resume exactly (`algorithms/resume.py`): RNG states restored before the next training
    batch, frozen weights recorded by identity instead of stored (`frozen_weights()`: the reference, and the
    base weights under LoRA adapters), and `resume_state()`.
A stage provides `validate_batch(batch)`, `trained_model()`, `lr_schedule()` and, if it writes more than
one model, `exports()`. `SupervisedStage` adds the arguments SFT and the reward model share.
Simplified: one optimizer here (PPO overrides `configure_optimizers` for two).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable

from lightning_rlhf.algorithms.guard import NonFiniteGuard
from lightning_rlhf.algorithms.metrics import Means
from lightning_rlhf.algorithms.resume import (
    KEY, drop_frozen, frozen_entries, identity, restore_frozen, rng_state, set_rng_state,
)
from lightning_rlhf.algorithms.runtime import half_precision_warning
from lightning_rlhf.algorithms.schedules import make_scheduler
from lightning_rlhf.algorithms.sharding import full_parameters
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.models import save_hf
from lightning_rlhf.models.chat import encode_prompts
from lightning_rlhf.models.lora import LoraOptions, as_lora, export_lora, is_peft

log = logging.getLogger(__name__)
OptimizerFn = Callable[[Any], torch.optim.Optimizer]


def total_training_steps(trainer: Any) -> int:
    """Scheduler steps the trainer will run (max_steps, or epochs x batches when max_steps is -1)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


def source_record(kind: str, source: str, dtype: str = "float32", gguf_file: str | None = None,
                  tokenizer: str | None = None, padding_side: str = "left") -> dict[str, Any]:
    """How a trained model was loaded (`Stage.model_sources`): loader kind (causal_lm, critic, reward_model),
    source dir or id, dtype, GGUF file, and its tokenizer's source and padding side."""
    return {"kind": kind, "source": source, "gguf_file": gguf_file, "dtype": dtype, "tokenizer": tokenizer or source,
            "padding_side": padding_side}


def export_hf(model: Any, tokenizer: Any, output_dir: str | None, trainer: Any,
              lora: LoraOptions | None = None) -> Path | None:
    """Save `model` and `tokenizer` as an HF-format directory on global rank 0; None when not written. A PEFT
    model is written as `lora.export` says: merged (a plain HF dir) or adapter (PEFT's adapter dir)."""
    if output_dir is None or (trainer is not None and not trainer.is_global_zero):
        return None
    if is_peft(model):
        return export_lora(model, tokenizer, Path(output_dir), lora.export if lora else "merged", save_hf)
    return save_hf(model, tokenizer, Path(output_dir))


@torch.no_grad()
def generate_text(model: Any, tokenizer: Any, engine: Any, prompts: Sequence[str], *, max_new_tokens: int,
                  max_prompt_length: int) -> tuple[list[str], torch.Tensor]:
    """One greedy completion per prompt: (texts without special tokens, (N,) token lengths)."""
    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    device = next(model.parameters()).device
    ro = engine.generate(model, ids.to(device), mask.to(device), num_generations=1, max_new_tokens=max_new_tokens,
                         greedy=True, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return ro.decode(tokenizer), ro.response_lengths


def language_mixed_share(batch: dict[str, list], completions: Sequence[str]) -> list[float]:
    """Per completion 1.0 when its reasoning mixes languages (`rewards.rules.language_mixed`), for validation
    sets that have a `language` column (the bilingual task); [] for any other set."""
    from lightning_rlhf.rewards.rules import language_mixed

    if "language" not in batch:
        return []
    return [float(language_mixed(p, c)) for p, c in zip(batch["prompt"], completions)]


class Stage(LightningModule):
    """Validation lifecycle, optimizer + schedule and export shared by every stage (see module docstring)."""

    def __init__(self, optimizer: OptimizerFn, val_on_start: bool, output_dir: str | None,
                 lora: LoraOptions | None = None, max_skipped_in_a_row: int = 3) -> None:
        super().__init__()
        self.guard = NonFiniteGuard(max_skipped_in_a_row)
        self.optimizer_fn, self.lora_cfg = optimizer, as_lora(lora)
        self.val_on_start = val_on_start
        self.output_dir = output_dir
        self.val_metrics = Means()
        self.eval_history: list[tuple[int, dict[str, float]]] = []
        self.export_dir: Path | None = None
        self._pending_rng: dict[str, Any] | None = None
        # attribute -> how that trained model was loaded (`export.py` rebuilds it from a checkpoint)
        self.model_sources: dict[str, dict[str, Any]] = {}
        self._frozen_identity: dict[str, dict[str, Any]] = {}

    # ---- what a stage provides -----------------------------------------------------------------------
    def full_parameters(self, module: torch.nn.Module) -> ContextManager[None]:
        """A context with `module`'s parameters whole on this rank under FSDP / ZeRO-3 (for generation)."""
        return full_parameters(self._trainer.strategy if self._trainer is not None else None, module)

    def validate_batch(self, batch: dict[str, list]) -> None:
        raise NotImplementedError

    def trained_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def lr_schedule(self) -> tuple[str, int]:
        """(schedule name, warmup steps) for the optimizer of `trained_model()`."""
        raise NotImplementedError

    def exports(self) -> list[tuple[torch.nn.Module, str | None]]:
        """(model, output_dir) pairs written at the end of fit; the first is the stage's result."""
        return [(self.trained_model(), self.output_dir)]

    def frozen_modules(self) -> dict[str, tuple[torch.nn.Module, bool, str]]:
        """{attribute: (module, whole module frozen?, source)} whose frozen weights stay out of checkpoints: with
        LoRA the base weights of each trained model (RLStage adds its reference)."""
        if self.lora_cfg is None:
            return {}
        return {name: (getattr(self, name), False, src["source"]) for name, src in self.model_sources.items()}

    def frozen_weights(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """{name: (state-dict entries, identity)} of `frozen_modules()`; identities computed once (they never
        change during a run)."""
        out = {}
        for name, (module, whole, source) in self.frozen_modules().items():
            entries = frozen_entries(module, name, everything=whole)
            if name not in self._frozen_identity:
                self._frozen_identity[name] = identity(entries, source)
            out[name] = (entries, self._frozen_identity[name])
        return out

    def resume_state(self) -> dict[str, Any]:
        """What the stage needs besides weights and optimizers to continue exactly (saved in checkpoints)."""
        return {"eval_history": self.eval_history, "guard": self.guard.state_dict()}

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.eval_history = [(int(s), dict(m)) for s, m in state.get("eval_history", [])]
        self.guard.load_state_dict(state.get("guard", {}))

    def any_rank(self) -> Callable[[bool], bool] | None:
        """A flag -> whether it is set on any rank (None on one process), for decisions every rank must share."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return None
        return lambda flag: bool(self.trainer.strategy.reduce(torch.tensor(float(flag), device=self.device),
                                                              reduce_op="sum") > 0)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Automatic optimization (SFT, reward model): skip an update with a non-finite gradient (the guard)."""
        if not self.automatic_optimization:
            return
        if self.guard.should_skip({}, {"model": self.trained_model()}, self.global_step + 1, self.any_rank()):
            optimizer.zero_grad(set_to_none=True)  # no gradients: the optimizer leaves every weight as it is
        self.log("train/skipped_updates", float(self.guard.skipped))

    # ---- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        drop_frozen(checkpoint, {name: ident for name, (_, ident) in self.frozen_weights().items()})
        checkpoint[KEY].update(rng=rng_state(), stage=self.resume_state(), exports=self.export_records())

    def export_records(self) -> list[dict[str, Any]]:
        """Per exported model: its attribute, output_dir, how it was loaded and the LoRA options (for `export`)."""
        attrs = {id(getattr(self, a)): a for a in self.model_sources}
        lora = None if self.lora_cfg is None else dataclasses.asdict(self.lora_cfg)
        return [{"attr": attrs[id(m)], "output_dir": out, "lora": lora, **self.model_sources[attrs[id(m)]]}
                for m, out in self.exports() if id(m) in attrs]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(checkpoint, self.frozen_weights(), path=str(getattr(self._trainer, "ckpt_path", None) or
                                                                   "the checkpoint"))
        extra = checkpoint.get(KEY, {})
        self._pending_rng = extra.get("rng")
        self.load_resume_state(extra.get("stage", {}))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:  # after a resume: the RNG as it stood when the checkpoint was saved
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    # ---- validation ----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.validate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        if not self.trainer.sanity_checking:
            # already reduced across ranks by `Means`; the mean of equal values is the value
            self.log_dict(metrics, sync_dist=True)
            self.eval_history.append((self.global_step, metrics))

    def on_train_start(self) -> None:
        if self.device.type == "cpu" and self.trainer.is_global_zero:  # a precision this CPU only emulates
            sampling = getattr(getattr(self, "rollout_cfg", None), "dtype", None)  # the RL stages' rollout.dtype
            warning = half_precision_warning(self.trainer.precision, sampling)
            if warning:
                log.warning(warning)
        self.validate_at_start()

    def validate_at_start(self) -> None:
        """Validate before the first update and log the result at step 0."""
        trainer = self.trainer
        if not self.val_on_start or not trainer.val_dataloaders or self.global_step > 0:  # >0: resumed
            return
        model = self.trained_model()
        model.eval()
        for batch in itertools.islice(trainer.val_dataloaders, val_batch_limit(trainer)):
            self.validate_batch(batch)
        model.train()
        metrics = self.val_metrics.compute()
        if trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
                logger.save()
        self.eval_history.append((0, metrics))

    # ---- optimizer and export ------------------------------------------------------------------------
    def make_optimizer(self, fn: OptimizerFn, model: torch.nn.Module, schedule: tuple[str, int]) -> tuple[Any, Any]:
        """(optimizer over the trainable parameters of `model` (LoRA: the adapters), its LR scheduler) for
        `total_training_steps` scheduler steps."""
        try:
            opt = fn([p for p in model.parameters() if p.requires_grad])
        except ValueError as e:  # torch.optim checks its arguments (a negative lr, betas outside [0, 1), ...)
            raise ConfigError(f"optimizer: {e}; fix its init_args (model.init_args.optimizer)") from e
        return opt, make_scheduler(opt, schedule[0], schedule[1], total_training_steps(self.trainer))

    def configure_optimizers(self) -> Any:
        opt, sched = self.make_optimizer(self.optimizer_fn, self.trained_model(), self.lr_schedule())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        lora = self.lora_cfg
        written = [export_hf(model, self.tokenizer, out, self.trainer, lora) for model, out in self.exports()]
        self.export_dir = written[0]


class SupervisedStage(Stage):
    """What SFT and the reward model share: a start checkpoint, an optimizer with a schedule, a length cap.

    Args:
        output_dir: where the trained model is written (HF format) at the end; None skips it.
        produced_by: the recipe that writes the start checkpoint, named in the error when it is missing.
        optimizer: any torch.optim class (default AdamW, lr 1e-4, no weight decay).
        lr_schedule: constant, linear or cosine, over the run's optimizer steps.
        warmup_steps: linear warmup steps of the schedule.
        max_length: tokens kept per training text (cut at the end).
        val_on_start: validate before the first update (logged at step 0).
        lora: train LoRA adapters through PEFT instead of every weight (`models/lora.py`); null: full fine-tuning.
        max_skipped_in_a_row: updates with a non-finite loss or gradient are skipped; this many in a row stop the run.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        produced_by: str | None = None,
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
        lr_schedule: str = "cosine",
        warmup_steps: int = 0,
        max_length: int = 512,
        val_on_start: bool = True,
        lora: LoraOptions | None = None,
        max_skipped_in_a_row: int = 3,
    ) -> None:
        super().__init__(optimizer, val_on_start, output_dir, lora, max_skipped_in_a_row)
        self.save_hyperparameters()
        self.produced_by, self.schedule, self.max_length = produced_by, (lr_schedule, warmup_steps), max_length

    def lr_schedule(self) -> tuple[str, int]:
        return self.schedule


def val_batch_limit(trainer: Any) -> int | None:
    """How many validation batches `trainer.limit_val_batches` allows (an int: that many; a float: that share
    of the loader, at least one; 1.0: all, None), so the step-0 validation honours it like Lightning's own."""
    limit = trainer.limit_val_batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        return limit
    if limit is None or float(limit) >= 1.0:
        return None
    return max(1, int(len(trainer.val_dataloaders) * float(limit))) if float(limit) > 0 else 0
