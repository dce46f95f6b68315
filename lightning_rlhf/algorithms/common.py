"""Helpers the stages share: chat formatting, batch building, LR schedules, metric sums, exporting.

Kept as plain functions so each LightningModule stays a readable list of steps. Simplifications:
prompts are single-turn user messages; a completion is the assistant turn followed by the eos token.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from lightning_rlhf.registry import Registry

LR_SCHEDULES = Registry("lr schedule")

# Validation metrics are reduced across ranks by MetricSums before they are logged, so Lightning's advice
# to add sync_dist=True would average them a second time.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


@LR_SCHEDULES.register("constant")
def _constant(progress: float) -> float:
    return 1.0


@LR_SCHEDULES.register("linear")
def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


@LR_SCHEDULES.register("cosine")
def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0, so train-mode forwards match the sampling (eval) forwards."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
    return model


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_steps`, then the named decay over the remaining steps."""
    decay = LR_SCHEDULES.get(name)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay((step - warmup_steps) / max(1, total - warmup_steps))

    return LambdaLR(optimizer, factor)


def adamw_with_schedule(params: Any, hp: Any, trainer: Any) -> dict[str, Any]:
    """AdamW(lr, weight_decay) with `make_scheduler(lr_schedule, warmup_steps)` over the run's optimizer steps."""
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    sched = make_scheduler(opt, hp.lr_schedule, hp.warmup_steps, total_training_steps(trainer))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def total_training_steps(trainer: Any) -> int:
    """Optimizer steps the trainer will run (max_steps, or epochs x batches when max_steps is -1)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches)


def chat_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Format each prompt as a single user turn plus the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    return list(prompts)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad prompts -> (input_ids, attention_mask), truncated from the left."""
    texts = chat_prompts(tokenizer, prompts)
    side, tside = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                        add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, tside
    return enc["input_ids"], enc["attention_mask"]


def encode_completions(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Prompt + completion + eos, right-padded. `labels` are -100 on prompt and padding tokens.

    Returns input_ids, attention_mask, labels (B, L) and `response_mask` (B, L) = 1 on completion tokens.
    Sequences longer than max_length are cut at the end (the eos may be lost; that is counted as
    truncation by the caller if it cares).
    """
    eos = tokenizer.eos_token or ""
    rows = []
    for ptxt, comp in zip(chat_prompts(tokenizer, prompts), completions):
        p_ids = tokenizer(ptxt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(comp + eos, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, c_ids))
    L = min(max_length, max(len(p) + len(c) for p, c in rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = (p + c)[:L]
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        if len(seq) > len(p):
            labels[i, len(p) : len(seq)] = torch.tensor(seq[len(p) :])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "response_mask": (labels != -100).long()}


@torch.no_grad()
def generate_text(
    model: Any, tokenizer: Any, engine: Any, prompts: Sequence[str], *, max_new_tokens: int,
    max_prompt_length: int, greedy: bool = True, temperature: float = 1.0,
) -> tuple[list[str], torch.Tensor]:
    """Generate one completion per prompt (greedy by default): (texts without special tokens, (N,) token lengths)."""
    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    device = next(model.parameters()).device
    ro = engine.generate(
        model, ids.to(device), mask.to(device), num_generations=1, max_new_tokens=max_new_tokens,
        greedy=greedy, temperature=temperature,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return ro.decode(tokenizer), ro.response_lengths


def format_conversation(tokenizer: Any, prompt: str, completion: str) -> str:
    """The text a reward model scores: the user prompt and the assistant completion, chat-formatted."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
    return prompt + completion


class MetricSums:
    """Accumulates (sum, count) per metric over batches; `compute` reduces across ranks then divides."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, total: float | torch.Tensor, count: float | torch.Tensor) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)

    def compute(self, strategy: Any = None) -> dict[str, float]:
        names = sorted(self.sums)
        if not names:
            return {}
        t = torch.tensor([[self.sums[n] for n in names], [self.counts[n] for n in names]], dtype=torch.float64)
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            t = strategy.reduce(t.to(strategy.root_device), reduce_op="sum").cpu()
        self.sums.clear()
        self.counts.clear()
        return {n: float(t[0, i] / t[1, i]) if t[1, i] > 0 else float("nan") for i, n in enumerate(names)}


def log_to_loggers(module: Any, metrics: dict[str, float], step: int) -> None:
    """Write metrics to every logger at an explicit step (used for the step-0 validation)."""
    if module.trainer is None or not module.trainer.is_global_zero:
        return
    for lg in module.loggers:
        lg.log_metrics(metrics, step=step)
        lg.save()


def validate_at_start(module: Any, validate_batch: Any, model: torch.nn.Module) -> None:
    """Run `validate_batch` over the val loader before the first update and log the result at step 0."""
    trainer = module.trainer
    if not module.hparams.val_on_start or not trainer.val_dataloaders:
        return
    model.eval()
    for batch in trainer.val_dataloaders:
        validate_batch(batch)
    model.train()
    metrics = module.val_sums.compute(trainer.strategy)
    log_to_loggers(module, metrics, step=0)
    module.eval_history.append((0, metrics))


def finish_validation(module: Any) -> None:
    """Reduce the validation sums across ranks, log them, and remember them for the run summary."""
    metrics = module.val_sums.compute(module.trainer.strategy)
    if not module.trainer.sanity_checking:
        module.log_dict(metrics, sync_dist=False)
        module.eval_history.append((module.global_step, metrics))


def export_hf(model: Any, tokenizer: Any, output_dir: str | None, trainer: Any) -> Path | None:
    """Save `model` and `tokenizer` as an HF-format directory on global rank 0."""
    if output_dir is None or (trainer is not None and not trainer.is_global_zero):
        return None
    from lightning_rlhf.models import save_hf

    out = Path(output_dir)
    save_hf(model, tokenizer, out)
    return out
