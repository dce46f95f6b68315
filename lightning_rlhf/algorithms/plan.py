"""The effective plan of an RL stage, printed before training, and the batch-size check behind it.

`plan_lines(...)` says per rollout step and rank: prompts x num_generations = responses, the mini/micro-batch
split and optimizer steps, the token budget, the advantage estimator and policy loss, the rewards and the KL
setting; a stage appends lines of its own (PPO: its critic). The check fails
before any rollout when mini/micro-batch sizes do not divide the responses of a step. `no_grad_rows` sizes the
no-grad forwards (the reference's log-probs, recomputed old log-probs, PPO's old values).
"""

from __future__ import annotations

from typing import Any

from lightning_rlhf.algorithms.options import LossOptions, OptimOptions, RolloutOptions
from lightning_rlhf.errors import ConfigError


def check_batch_sizes(n: int, mini: int | None, micro: int | None) -> tuple[int, int]:
    """Resolve mini/micro batch sizes (responses) and check they divide the rollout."""
    mini = mini or n
    micro = micro or mini
    if n % mini:
        raise ConfigError(f"mini_batch_size={mini} does not divide the {n} responses of a step "
                          f"(prompts per step x num_generations); pick a divisor of {n}")
    if mini % micro:
        raise ConfigError(f"micro_batch_size={micro} does not divide mini_batch_size={mini}; pick a divisor of {mini}")
    return mini, micro


NO_GRAD_LOGITS = 2**26  # logits elements one no-grad forward may hold (256 MB in float32) when its rows are not set


def no_grad_rows(n: int, o: OptimOptions, t: int, vocab: int | None) -> int:
    """Rows per no-grad forward over a rollout of `n` responses of `t` tokens: optim.logprob_micro_batch_size when
    set; else as many as keep that forward's (rows, t, vocab) logits within NO_GRAD_LOGITS elements (vocab None,
    unknown: micro_batch_size), at least micro_batch_size and at most n. Such a pass keeps no activations for a
    backward, so it can take more rows than a micro-batch, in larger, faster matmuls."""
    if o.logprob_micro_batch_size:
        return o.logprob_micro_batch_size
    micro = min(n, o.micro_batch_size or n)
    if not vocab:
        return micro
    return max(micro, min(n, NO_GRAD_LOGITS // (max(t, 1) * vocab)))


def prompts_per_step(trainer: Any) -> int | None:
    """Prompts per rollout step and rank: the data module's batch_size, else the train loader's."""
    prompts = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
    if prompts is None and trainer.train_dataloader is not None:
        prompts = getattr(trainer.train_dataloader, "batch_size", None)
    return prompts if isinstance(prompts, int) else None


def plan_lines(stage_name: str, trainer: Any, r: RolloutOptions, o: OptimOptions, loss: LossOptions,
               estimator: str, rewards: list[str], reference: str, vocab: int | None = None) -> list[str]:
    """Check the batch sizes (ConfigError before any work), then describe one rollout step of `trainer`.
    `reference`: what the KL's reference is, in words ("no reference model", "reference loaded", ...)."""
    prompts = prompts_per_step(trainer)
    n = prompts * r.num_generations if prompts else None
    mini, micro = check_batch_sizes(n, o.mini_batch_size, o.micro_batch_size) if n else ("?", "?")
    steps = o.epochs * (n // mini) if n else "?"
    clip_high = loss.clip_low if loss.clip_high is None else loss.clip_high
    return [
        f"[{stage_name}] plan per rollout step (per rank; {trainer.world_size} rank(s)):",
        f"  prompts/step          {prompts or '?'} x num_generations {r.num_generations} = responses {n or '?'}",
        f"  mini-batches          {mini} responses, micro-batches {micro}, no-grad forwards "
        f"{no_grad_rows(n, o, r.max_new_tokens, vocab) if n else '?'}"
        f"{'' if o.logprob_micro_batch_size else ' (at max_new_tokens; more when responses are shorter)'}",
        f"  optimizer steps       {steps} per rollout (optim.epochs {o.epochs}); "
        f"trainer.max_steps={trainer.max_steps} counts rollout steps",
        f"  tokens/step (max)     {(n or 0) * (r.max_prompt_length + r.max_new_tokens)} "
        f"(prompt <= {r.max_prompt_length}, response <= {r.max_new_tokens})",
        f"  advantage, loss       {estimator}; {loss.name} (clip {loss.clip_low}/{clip_high}, {loss.agg})",
        f"  reward                {', '.join(rewards)}; beta {loss.beta} ({loss.kl_kind}, "
        f"{reference})",
    ]
