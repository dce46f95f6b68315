"""Pieces GRPO and PPO share: loading policy + reference, rollout + scoring, metrics, validation, plan.

Plain functions taking the LightningModule, so each stage's `training_step` still reads as its own
numbered list of steps. The module is expected to have `policy`, `tokenizer`, `engine`, `reward_fn`
and the hyperparameters named below.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.algorithms.common import encode_prompts, generate_text, disable_dropout


def load_policy_and_ref(
    policy: str, ref_model: str | None, beta: float, produced_by: str | None, gguf_file: str | None, dtype: str
) -> tuple[Any, Any, Any]:
    """Load the trainable policy, its tokenizer and (only when beta > 0) a frozen reference model."""
    from lightning_rlhf.models import load_causal_lm, load_tokenizer, require_checkpoint

    require_checkpoint(policy, produced_by)
    tokenizer = load_tokenizer(policy)
    model = disable_dropout(load_causal_lm(policy, gguf_file=gguf_file, dtype=dtype)).train()
    ref = None
    if beta > 0:
        ref_path = ref_model or policy
        require_checkpoint(ref_path, produced_by)
        ref = disable_dropout(load_causal_lm(ref_path, gguf_file=gguf_file if ref_model is None else None, dtype=dtype))
        ref.eval().requires_grad_(False)
    return model, ref, tokenizer


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


def repeat_columns(batch: dict[str, list], g: int) -> tuple[list[str], dict[str, list]]:
    """Repeat every prompt and column value g times consecutively (rows i*g .. i*g+g-1 = prompt i)."""
    rep = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items()}
    prompts = rep.pop("prompt")
    return prompts, rep


@torch.no_grad()
def reference_logprobs(ref: Any, ro: Any, temperature: float, chunk: int | None) -> torch.Tensor | None:
    """Log-probs of the rollout under the frozen reference, `chunk` responses per forward (None: all)."""
    if ref is None:
        return None
    from lightning_rlhf.rollout import sequence_logprobs

    idx = torch.arange(len(ro), device=ro.response_ids.device)
    return torch.cat([sequence_logprobs(ref, ro.select(i), temperature) for i in idx.split(chunk or len(ro))])


@torch.no_grad()
def rollout_and_score(module: Any, batch: dict[str, list], *, num_generations: int) -> tuple[Any, Any]:
    """Steps 1-2 of an RL step: sample `num_generations` responses per prompt and score them."""
    hp = module.hparams
    ids, mask = encode_prompts(module.tokenizer, batch["prompt"], hp.max_prompt_length)
    ro = module.engine.generate(
        module.policy, ids.to(module.device), mask.to(module.device), num_generations=num_generations,
        max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
        eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id,
    )
    prompts, columns = repeat_columns(batch, num_generations)
    module.last_completions = ro.decode(module.tokenizer)
    rewards = module.reward_fn(prompts, module.last_completions, columns)
    return ro, rewards


def rollout_metrics(ro: Any, rewards: Any, rollout_s: float, update_s: float) -> dict[str, float]:
    """The reward/length/timing metrics every RL stage logs for a step."""
    total = rewards.total.float()
    lengths = ro.response_lengths.float()
    m = {
        "train/reward": float(total.mean()),
        "train/reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "train/response_length": float(lengths.mean()),
        "train/truncated_fraction": float(ro.truncated.float().mean()),
        "train/reward_errors": float(rewards.errors),
        "perf/rollout_s": rollout_s,
        "perf/update_s": update_s,
        "perf/tokens_per_s": float(lengths.sum()) / max(rollout_s + update_s, 1e-9),
    }
    for name, vals in rewards.per_reward.items():
        m[f"train/rewards/{name}"] = float(vals.float().mean())
    return m


def validate_batch(module: Any, batch: dict[str, list], sums: Any) -> None:
    """Greedy completions for held-out prompts -> val/accuracy (exact task answer) and val/reward."""
    from lightning_rlhf.rewards import build_reward, parse_reward_specs

    hp = module.hparams
    if getattr(module, "val_accuracy_fn", None) is None:  # built once: the task's exact-answer check
        module.val_accuracy_fn = build_reward(parse_reward_specs({hp.val_accuracy_reward: 1.0})[0])
    completions, lengths = generate_text(module.policy, module.tokenizer, module.engine, batch["prompt"],
                                max_new_tokens=hp.val_max_new_tokens or hp.max_new_tokens,
                                max_prompt_length=hp.max_prompt_length)
    columns = {k: v for k, v in batch.items() if k != "prompt"}
    n = len(completions)
    correct = module.val_accuracy_fn(batch["prompt"], completions, **columns)
    sums.add("val/accuracy", sum(correct), n)
    out = module.reward_fn(batch["prompt"], completions, columns)
    sums.add("val/reward", out.total.sum(), n)
    sums.add("val/response_length", lengths.sum(), n)


def print_plan(module: Any) -> None:
    """Check the batch sizes, then print prompts/responses per step, mini-batches and optimizer steps per
    rollout, and tokens per step (rank 0)."""
    hp, trainer = module.hparams, module.trainer
    prompts = getattr(trainer.datamodule, "batch_size", None)  # prompts per step, per rank
    if prompts is None and trainer.train_dataloader is not None:
        prompts = getattr(trainer.train_dataloader, "batch_size", None)
    prompts = prompts or "?"
    world = trainer.world_size
    g = hp.num_generations
    n = prompts * g if isinstance(prompts, int) else None
    if n is not None:
        check_batch_sizes(n, hp.mini_batch_size, hp.micro_batch_size)  # fail before any work, not at step 1
    mini = hp.mini_batch_size or n
    micro = hp.micro_batch_size or mini
    per_rollout = hp.num_iterations * (n // mini) if n and mini else "?"
    lines = [
        f"[{type(module).__name__}] plan per rollout step (per rank; {world} rank(s)):",
        f"  prompts/step          {prompts}   x num_generations {g} = responses/step {n or '?'}",
        f"  mini-batches          {mini} responses, micro-batches {micro} (grad accumulation "
        f"{(mini // micro) if isinstance(mini, int) and isinstance(micro, int) else '?'})",
        f"  optimizer steps       {per_rollout} per rollout (num_iterations {hp.num_iterations}); "
        f"trainer.max_steps={trainer.max_steps} counts rollout steps",
        f"  tokens/step (max)     {(n or 0) * (hp.max_prompt_length + hp.max_new_tokens)} "
        f"(prompt <= {hp.max_prompt_length}, response <= {hp.max_new_tokens})",
        f"  reward                {', '.join(module.reward_fn.names)};  beta {hp.beta} "
        f"({'reference loaded' if getattr(module, 'ref', None) is not None else 'no reference model'})",
    ]
    if trainer.is_global_zero:
        print("\n".join(lines), flush=True)
