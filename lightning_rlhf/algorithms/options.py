"""Typed option groups of the RL stages: one vocabulary for GRPO and PPO.

Each group is a frozen dataclass, so LightningCLI shows it nested under the stage's `init_args`, prints it
with `--print_config`, documents every field in `--help`, overrides one field at a time
(`--model.init_args.loss.beta 0.1`) and names a misspelt or wrong-typed key. Each group checks its value ranges
when built (a ConfigError naming `group.field=value`, e.g. `rollout.temperature=-1.0`). The stages read these objects;
nothing reads hyperparameters off the LightningModule by name.

    rollout:   how responses are sampled (group size, lengths, temperature, engine)
    advantage: which estimator turns rewards into advantages (`ADVANTAGE_ESTIMATORS`)
    loss:      which policy loss (`POLICY_LOSSES`), its clipping, KL term and token aggregation
    optim:     how a rollout is consumed: passes, mini/micro-batches, gradient clipping, LR schedule
               (the optimizer itself is the stage's `optimizer:` argument, any `torch.optim` class)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightning_rlhf.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class RolloutOptions:
    """Sampling settings.

    Args:
        num_generations: responses sampled per prompt (the group size G; consecutive rows of a rollout).
        max_new_tokens: response budget in tokens; a response without eos by then counts as truncated.
        min_new_tokens: eos cannot be sampled before this many tokens (as HF generate's option; benchmarks
            use it to force equal lengths).
        max_prompt_length: prompt tokens kept (cut from the left).
        temperature: sampling temperature; the loss scores the policy at the same temperature.
        top_p: nucleus sampling (1.0 disables it).
        top_k: top-k sampling (0 disables it).
        engine: rollout engine by name (`ROLLOUT_ENGINES`): static (fast, Llama-family models; others fall
            back to hf) or hf (`generate`).
        engine_kwargs: settings passed to the engine's constructor (e.g. max_batch_size).
        dtype: sampling precision (float32, bfloat16, float16; None: the policy's). `python -m lightning_rlhf
            doctor` says which is faster on this machine.
        sampling_seed: keyed sampling (static engine): each response's random numbers are a function of this
            seed, the training step, the prompt text and the sample's index, so a prompt gets the same
            responses on any number of ranks, in any batch, and after a resume. None: torch's generator.
    """

    num_generations: int = 8
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    max_prompt_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    engine: str = "static"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        check_ranges("rollout", self, {"num_generations": (1, None), "max_new_tokens": (1, None),
                                       "min_new_tokens": (0, self.max_new_tokens), "max_prompt_length": (1, None),
                                       "top_k": (0, None)})
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature={self.temperature}: must be > 0 (1.0 samples the model as it is; "
                              "lower is greedier)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.top_p}: must be in (0, 1] (1.0 turns nucleus sampling off)")


@dataclass(frozen=True)
class AdvantageOptions:
    """Advantage estimation.

    Args:
        estimator: name in `ADVANTAGE_ESTIMATORS`: gae, grpo, dr_grpo, rloo, reinforce++_baseline.
        eps: added to the group std by group-normalised estimators.
        gamma: discount (GAE).
        lam: GAE's lambda.
        whiten: whiten the advantages over the real tokens of the batch (all ranks) after estimating them.
    """

    estimator: str = "grpo"
    eps: float = 1e-6
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = False


@dataclass(frozen=True)
class LossOptions:
    """Policy loss.

    Args:
        name: name in `POLICY_LOSSES`: grpo (surrogate + beta * KL in the loss) or ppo_clip (surrogate -
            ent_coef * entropy).
        clip_low: lower clip range of the ratio (1 - clip_low).
        clip_high: upper clip range (1 + clip_high); None = clip_low; larger is DAPO's clip-higher.
        agg: token aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm.
        max_len: the constant of seq-mean-token-sum-norm (None: rollout.max_new_tokens).
        beta: KL coefficient to the frozen reference (0: no reference model is loaded). GRPO adds it to the
            loss; PPO puts -beta * kl into the per-token reward (InstructGPT).
        kl_kind: KL estimator: k1, k2 or k3.
        ent_coef: entropy bonus coefficient.
    """

    name: str = "grpo"
    clip_low: float = 0.2
    clip_high: float | None = None
    agg: str = "token-mean"
    max_len: int | None = None
    beta: float = 0.04
    kl_kind: str = "k3"
    ent_coef: float = 0.0

    def __post_init__(self) -> None:
        check_ranges("loss", self, {"clip_low": (0, None), "clip_high": (0, None), "beta": (0, None),
                                    "max_len": (1, None)})


@dataclass(frozen=True)
class OptimOptions:
    """How each rollout is consumed by the optimizer(s).

    Args:
        epochs: passes over each rollout (GRPO's mu, PPO's epochs).
        mini_batch_size: responses per optimizer step (None: the whole rollout).
        micro_batch_size: responses per forward/backward, accumulated into a mini-batch (None: the mini-batch).
        logprob_micro_batch_size: responses per no-grad forward: the reference's log-probs, recomputed old
            log-probs, PPO's old values (None: as many as keep its logits within 2**26 elements, at least
            micro_batch_size; `algorithms/plan.py: no_grad_rows`). Such a pass keeps no activations for a
            backward, so it can take several times micro_batch_size, in larger, faster matmuls (SmolLM2-135M on
            2 AVX2 cores, 32 responses of 57 tokens: 4.9 s at 4 rows per forward, 3.1 s at 16, 2.9 s at 32).
        max_grad_norm: gradient-norm clipping per optimizer step (None: off).
        lr_schedule: constant, linear or cosine, over trainer.max_steps rollout steps.
        warmup_steps: linear warmup steps of the schedule.
        old_logprobs: the "old" log-probs of the ratio: sampling (kept while sampling), recompute (a no-grad
            teacher-forced pass before the update, as verl) or auto (recompute when sampling and training
            precisions differ, where the sampling-time numbers would make the ratio != 1).
    """

    epochs: int = 1
    mini_batch_size: int | None = None
    micro_batch_size: int | None = None
    logprob_micro_batch_size: int | None = None
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    old_logprobs: str = "auto"

    def __post_init__(self) -> None:
        check_ranges("optim", self, {"mini_batch_size": (1, None), "micro_batch_size": (1, None),
                                     "logprob_micro_batch_size": (1, None), "warmup_steps": (0, None)})
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm={self.max_grad_norm}: must be > 0, or null to turn clipping off")


@dataclass(frozen=True)
class CriticOptions:
    """PPO's critic: where it starts, how it is clipped and scheduled, where it is written.

    Args:
        path: HF dir or id to start the critic from (default: by `init`).
        init: reward_model (the reward model's weights, InstructGPT) or policy (fresh head); default:
            reward_model when `rewards` has a reward_model entry, else policy.
        output_dir: where the trained critic is written at the end (HF format); None skips it.
        value_clip: clip range of the value loss around the old values (None: plain squared error).
        max_grad_norm: the critic's gradient-norm clipping (None: off).
        lr_schedule: the critic's LR schedule (None: optim.lr_schedule).
        warmup_steps: the critic's warmup steps (None: optim.warmup_steps).
    """

    path: str | None = None
    init: str | None = None
    output_dir: str | None = None
    value_clip: float | None = 0.2
    max_grad_norm: float | None = 1.0
    lr_schedule: str | None = None
    warmup_steps: int | None = None


def check_ranges(group: str, options: Any, bounds: dict[str, tuple[float, float | None]]) -> None:
    """ConfigError naming `<group>.<field>=<value>` and its range when a set field is outside [low, high]."""
    for name, (low, high) in bounds.items():
        value = getattr(options, name)
        if value is not None and (value < low or (high is not None and value > high)):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{group}.{name}={value}: must be {allowed}")


def as_options(cls: type[T], value: T | dict[str, Any] | None) -> T:
    """`value` as a `cls` instance: instances pass, dicts (from Python callers) are checked and converted."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(value) - valid)
        if bad:
            raise ConfigError(f"{cls.__name__}: unknown keys {bad}; valid keys: {sorted(valid)}")
        return cls(**value)
    raise ConfigError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")
