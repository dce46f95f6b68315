"""`RLStage`: the base of the RL stages (GRPO, PPO). It owns everything they share:

  - loading the policy, its tokenizer and (only when `loss.beta` > 0) a frozen reference model;
  - the rollout-and-score step: sample `rollout.num_generations` responses per prompt, score them with
    the weighted `rewards`; the reference's log-probs under no_grad, `optim.logprob_micro_batch_size` at a time;
  - advantages by the estimator named in `advantage.estimator` (optionally whitened across ranks);
  - the policy loss named in `loss.name`, on one micro-batch;
  - one mini/micro-batch iterator over a rollout (`batching.micro_batches`) and the optimizer step that advances
    `global_step` once per rollout (`algorithms/optim.py`);
  - greedy validation on held-out prompts (val/accuracy, val/reward, val/response_length), the plan
    printout before training, the optimizer and its schedule, export (from `Stage`).
GRPO and PPO add their numbered `training_step`, and PPO its critic. Simplified: the sampling log-probs
serve as the "old" policy (dropout is disabled so a teacher-forced pass reproduces them).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import Tensor

from lightning_rlhf.algorithms.batching import MicroBatch, micro_batches  # noqa: F401  (re-exported)
from lightning_rlhf.algorithms.metrics import Means
from lightning_rlhf.algorithms.optim import as_list, step
from lightning_rlhf.algorithms.options import (
    AdvantageOptions, LossOptions, OptimOptions, RolloutOptions, as_options,
)
from lightning_rlhf.algorithms.plan import check_batch_sizes, no_grad_rows, plan_lines
from lightning_rlhf.algorithms.runtime import keep_freed_memory
from lightning_rlhf.algorithms.schedules import LR_SCHEDULES
from lightning_rlhf.algorithms.stage import Stage, generate_text, language_mixed_share, source_record
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.functional import (
    ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, masked_whiten_all,
)
from lightning_rlhf.models import load_causal_lm, load_tokenizer, require_checkpoint
from lightning_rlhf.models.chat import encode_prompts
from lightning_rlhf.models.reloadable import ReleasedReference
from lightning_rlhf.models.lora import LoraOptions, adapters_disabled, apply_lora, lora_plan_lines
from lightning_rlhf.rewards import CombinedReward, RewardOutput, build_reward, parse_reward_specs
from lightning_rlhf.rollout import ROLLOUT_ENGINES, Rollout, sequence_logprobs, use_fused_training_ops
from lightning_rlhf.rollout.keyed import prompt_keys

log = logging.getLogger(__name__)
OLD_LOGPROBS = ("auto", "sampling", "recompute")


def repeat_columns(batch: dict[str, list], g: int) -> tuple[list[str], dict[str, list]]:
    """Repeat every prompt and column value g times consecutively (rows i*g .. i*g+g-1 = prompt i)."""
    rep = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items()}
    return rep.pop("prompt"), rep


def rollout_metrics(ro: Rollout, rewards: RewardOutput, rollout_s: float, update_s: float,
                    world_size: int = 1) -> dict[str, float]:
    """The reward/length/timing metrics every RL stage logs for a step: means over the rows of every rank
    (`Means` synchronises them; every rank holds the same number of rows), the reward's unbiased std over all
    rows, the reward errors of all ranks, and this rank's timings (perf/tokens_per_s: every rank's tokens)."""
    dev = ro.response_ids.device
    total, lengths = rewards.total.to(dev, torch.float64), ro.response_lengths.to(torch.float64)
    means = Means()
    means.update("train/reward", total)
    means.update("reward_sq", total**2)
    means.update("train/response_length", lengths)
    means.update("train/truncated_fraction", ro.truncated.to(torch.float64))
    means.update("errors_per_row", torch.full((len(ro),), float(rewards.errors) / len(ro), device=dev))
    for name, v in rewards.per_reward.items():
        means.update(f"train/rewards/{name}", v.to(dev, torch.float64))
    if ro.group_size > 1:  # groups whose G rewards are all equal: zero advantage under group normalisation
        groups = total.view(-1, ro.group_size)
        means.update("train/frac_zero_std_groups", (groups.std(dim=1, unbiased=True) < 1e-8).to(torch.float64))
    m, n = means.compute(), len(ro) * world_size
    mean, sq = m["train/reward"], m.pop("reward_sq")
    m["train/reward_std"] = math.sqrt(max(sq - mean * mean, 0.0) * n / (n - 1)) if n > 1 else 0.0
    m["train/reward_errors"] = m.pop("errors_per_row") * n
    m.update({"perf/rollout_s": rollout_s, "perf/update_s": update_s,
              "perf/tokens_per_s": m["train/response_length"] * n / max(rollout_s + update_s, 1e-9)})
    return m


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


def load_policy_and_ref(policy: str, ref_model: str | None, beta: float, produced_by: str | None,
                        gguf_file: str | None, dtype: str, ref_dtype: str | None = None,
                        lora: LoraOptions | None = None) -> tuple[Any, Any, Any]:
    """The trainable policy (dropout off; LoRA adapters with `lora`), its tokenizer and, only when beta > 0, a
    frozen reference: none with `lora` and no `ref_model` (the reference is the policy with adapters off)."""
    if lora is not None and ref_model is None and ref_dtype is not None:
        raise ConfigError("ref_dtype: with lora the reference is the policy's own base weights (adapters off), "
                          "not a second copy; drop ref_dtype (or set ref_model to load a separate reference)")
    require_checkpoint(policy, produced_by)
    tokenizer = load_tokenizer(policy)
    model = disable_dropout(apply_lora(load_causal_lm(policy, gguf_file=gguf_file, dtype=dtype), lora)).train()
    use_fused_training_ops(model)  # a small float32 model on a CPU: fused RMSNorm and SiLU kernels
    ref = None
    if beta > 0 and (lora is None or ref_model is not None):
        ref_path = ref_model or policy
        require_checkpoint(ref_path, produced_by)
        ref = disable_dropout(load_causal_lm(ref_path, gguf_file=gguf_file if ref_model is None else None,
                                             dtype=ref_dtype or dtype))
        ref.eval().requires_grad_(False)
    return model, ref, tokenizer


def check_names(advantage: AdvantageOptions, loss: LossOptions, optim: OptimOptions) -> None:
    """Fail at construction, listing the valid names, on a misspelt registry name or an impossible count."""
    ADVANTAGE_ESTIMATORS.get(advantage.estimator), POLICY_LOSSES.get(loss.name)
    KL_ESTIMATORS.get(loss.kl_kind), LOSS_AGGREGATIONS.get(loss.agg), LR_SCHEDULES.get(optim.lr_schedule)
    if optim.epochs < 1:
        raise ConfigError(f"optim.epochs={optim.epochs}: need at least one pass over each rollout")
    if optim.old_logprobs not in OLD_LOGPROBS:
        raise ConfigError(f"optim.old_logprobs={optim.old_logprobs!r} is not one of {list(OLD_LOGPROBS)}")


class RLStage(Stage):
    """Shared machinery of the RL stages (see the module docstring).

    Args:
        policy: HF model id or local dir of the policy to train (the reference defaults to it).
        rewards: weighted reward functions by name, e.g. {accuracy: 1.0, format: 0.2}.
        ref_model: HF id or dir of the frozen reference (default: `policy`).
        output_dir: where the trained policy is written (HF format) at the end; None skips it.
        produced_by: the recipe that writes `policy`, named in the error when it is missing.
        gguf_file: load `policy` from this GGUF file inside its dir.
        dtype: weights dtype (float32, bfloat16, float16).
        ref_dtype: the frozen reference's weights dtype (None: `dtype`); bfloat16 halves its memory and, on a
            CPU with native bf16, its forward time, at the cost of reference log-probs ~4e-2 off per token
            (SmolLM2-135M: the k3 KL between identical models reads ~1.5e-3 instead of 0).
        release_ref_pages: after each use, free the reference's weights and read them back from its safetensors
            checkpoint before the next (`models/reloadable.py`): the update runs without them, and the reference
            reuses memory the update freed (SmolLM2-135M fp32 GRPO: peak RSS 4.10-4.20 -> 3.82-3.95 GB, for
            about 0.1-0.2 s a step). None (the default): on when the reference is on a CPU and its weights take
            at least AUTO_RELEASE_BYTES (64 MB), where a weight that cannot be read back (a GGUF checkpoint)
            keeps them all in memory without a warning; true or false decide.
        rollout: sampling options.
        advantage: advantage estimator options.
        loss: policy loss options.
        optim: passes, mini/micro-batches, gradient clipping and LR schedule per rollout.
        optimizer: the policy's optimizer (any torch.optim class).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        val_accuracy_reward: reward whose 0/1 score is val/accuracy (the task's exact-answer check).
        val_max_new_tokens: generation budget of validation (default: rollout.max_new_tokens).
        val_on_start: validate before the first update (logged at step 0).
        lora: train LoRA adapters (`models/lora.py`); the reference is then the policy with adapters off.
        max_skipped_in_a_row: updates with a non-finite loss or gradient are skipped (train/skipped_updates);
            this many in a row stop the run (`algorithms/guard.py`).
    """

    def __init__(
        self,
        policy: str,
        rewards: dict[str, float] | list[dict[str, Any]] | None = None,
        ref_model: str | None = None,
        output_dir: str | None = None,
        produced_by: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        ref_dtype: str | None = None,
        release_ref_pages: bool | None = None,
        rollout: RolloutOptions = RolloutOptions(),
        advantage: AdvantageOptions = AdvantageOptions(),
        loss: LossOptions = LossOptions(),
        optim: OptimOptions = OptimOptions(),
        optimizer: OptimizerCallable = lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.0),
        gradient_checkpointing: bool = False,
        val_accuracy_reward: str = "accuracy",
        val_max_new_tokens: int | None = None,
        val_on_start: bool = True,
        lora: LoraOptions | None = None,
        max_skipped_in_a_row: int = 3,
    ) -> None:
        super().__init__(optimizer, val_on_start, output_dir, lora, max_skipped_in_a_row)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.rollout_cfg, self.advantage_cfg = as_options(RolloutOptions, rollout), as_options(AdvantageOptions, advantage)
        self.loss_cfg, self.optim_cfg = as_options(LossOptions, loss), as_options(OptimOptions, optim)
        check_names(self.advantage_cfg, self.loss_cfg, self.optim_cfg)
        self.val_max_new_tokens = val_max_new_tokens or self.rollout_cfg.max_new_tokens
        self.policy_source, self.model_dtype, self.gradient_checkpointing = policy, dtype, gradient_checkpointing
        self.reward_fn = CombinedReward(rewards if rewards is not None else {"accuracy": 1.0})
        self.val_accuracy = build_reward(parse_reward_specs({val_accuracy_reward: 1.0})[0])
        self.policy, self.ref, self.tokenizer = load_policy_and_ref(
            policy, ref_model, self.loss_cfg.beta, produced_by, gguf_file, dtype, ref_dtype, self.lora_cfg)
        self.model_sources["policy"] = source_record("causal_lm", policy, dtype, gguf_file)
        self.ref_is_base = self.ref is None and self.lora_cfg is not None and self.loss_cfg.beta > 0
        self._ref_release = ReleasedReference(release_ref_pages, ref_model or policy)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        engine_kwargs = dict(self.rollout_cfg.engine_kwargs)
        if self.rollout_cfg.dtype is not None:  # engines take the sampling precision as `dtype`
            engine_kwargs.setdefault("dtype", self.rollout_cfg.dtype)
        self.engine = ROLLOUT_ENGINES.get(self.rollout_cfg.engine)(**engine_kwargs)
        if self.rollout_cfg.sampling_seed is not None and not self.engine.supports_keys:
            raise ConfigError(f"rollout.sampling_seed needs an engine that samples with keys (static); "
                              f"rollout.engine={self.rollout_cfg.engine!r} does not: use engine static or drop the seed")

    def trained_model(self) -> torch.nn.Module:
        return self.policy

    def frozen_modules(self) -> dict[str, tuple[torch.nn.Module, bool, str]]:
        """The frozen reference (when loaded) as a whole, plus the LoRA base weights (`Stage.frozen_modules`)."""
        frozen = super().frozen_modules()
        if self.ref is not None:
            frozen["ref"] = (self.ref, True, str(self.hparams.ref_model or self.hparams.policy))
        return frozen

    def lr_schedule(self) -> tuple[str, int]:
        return self.optim_cfg.lr_schedule, self.optim_cfg.warmup_steps

    # ---- steps of a rollout --------------------------------------------------------------------------
    @torch.no_grad()
    def rollout_and_score(self, batch: dict[str, list]) -> tuple[Rollout, RewardOutput]:
        """Sample `num_generations` responses per prompt and score them with the weighted rewards."""
        r, tok = self.rollout_cfg, self.tokenizer
        ids, mask = encode_prompts(tok, batch["prompt"], r.max_prompt_length)
        keys = None if r.sampling_seed is None else prompt_keys(batch["prompt"], r.sampling_seed, self.global_step)
        with self.full_parameters(self.policy):
            ro = self.engine.generate(
                self.policy, ids.to(self.device), mask.to(self.device), num_generations=r.num_generations,
                max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, temperature=r.temperature,
                top_p=r.top_p, top_k=r.top_k,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, prompt_keys=keys,
            )
        prompts, columns = repeat_columns(batch, ro.group_size)
        return ro, self.reward_fn(prompts, ro.decode(tok), columns)

    def recompute_old_logprobs(self) -> bool:
        """optim.old_logprobs, with auto resolved: recompute when sampling and training precisions differ."""
        mode = self.optim_cfg.old_logprobs
        if mode != "auto":
            return mode == "recompute"
        sampling = self.rollout_cfg.dtype
        mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
        return mixed or (sampling is not None and getattr(torch, sampling) != next(self.policy.parameters()).dtype)

    @torch.no_grad()
    def old_logprobs(self, ro: Rollout) -> tuple[Rollout, dict[str, float]]:
        """The rollout with its "old" log-probs recomputed by a teacher-forced pass when `recompute_old_logprobs`,
        and train/old_logprob_diff = mean |sampling - recomputed| over real tokens; unchanged otherwise."""
        if not self.recompute_old_logprobs():
            return ro, {}
        fresh = torch.cat([sequence_logprobs(self.policy, part, self.rollout_cfg.temperature)
                           for part in self.no_grad_parts(ro)])
        diff = Means()
        diff.update("train/old_logprob_diff", (fresh - ro.logprobs).abs(), ro.response_mask)
        return replace(ro, logprobs=fresh), diff.compute()

    @torch.no_grad()
    def reference_logprobs(self, ro: Rollout) -> Tensor | None:
        """Log-probs of the rollout under the frozen reference (LoRA: the policy, adapters off), by `no_grad_parts`."""
        if self.ref is None and not self.ref_is_base:
            return None
        model = self.policy if self.ref_is_base else self.ref
        with adapters_disabled(model), self.ref_weights_resident():
            return torch.cat([sequence_logprobs(model, part, self.rollout_cfg.temperature)
                              for part in self.no_grad_parts(ro)])

    def no_grad_parts(self, ro: Rollout) -> list[Rollout]:
        """`ro` in slices of `no_grad_rows` rows; one of whole groups keeps G, so each of its prompts runs once."""
        n, g = len(ro), ro.group_size
        rows = no_grad_rows(n, self.optim_cfg, ro.response_ids.shape[1], self.vocab_size())
        return [ro.select(slice(s, s + rows), g if s % g == 0 and min(rows, n - s) % g == 0 else 1)
                for s in range(0, n, rows)]

    def vocab_size(self) -> int | None:
        """The policy's vocabulary size (None when its config does not say)."""
        config = getattr(self.policy, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "vocab_size", None)

    def ref_weights_resident(self) -> contextlib.AbstractContextManager:
        """Where the reference is released between uses (`release_ref_pages`): its weights read back from its
        checkpoint for the block and freed after it (`models/reloadable.py`); otherwise nothing. Before the
        first release, checkpoints' record of the reference's identity is computed (it needs the weights)."""
        return self._ref_release.resident(self.ref, before_first=self.frozen_weights)

    def all_reduce_sum(self) -> Callable[[Tensor], Tensor] | None:
        """Element-wise sum over ranks for the estimators' batch statistics; None on one process."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return None
        return lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")

    @torch.no_grad()
    def advantages(self, rewards: Tensor, mask: Tensor, group_size: int,
                   values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(advantages, returns) (B, T) by `advantage.estimator` from per-token rewards, whitened if asked."""
        a, reduce = self.advantage_cfg, self.all_reduce_sum()
        adv, returns = ADVANTAGE_ESTIMATORS.get(a.estimator)(
            rewards, mask, group_size=group_size, values=values, gamma=a.gamma, lam=a.lam, eps=a.eps,
            all_reduce=reduce)
        return (masked_whiten_all(adv, mask, reduce) if a.whiten else adv), returns

    def world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def micro_batches(self, ro: Rollout) -> Iterator[MicroBatch]:
        """This rank's mini/micro-batches; token-mean weights count the tokens of every rank."""
        o, reduce, world = self.optim_cfg, self.all_reduce_sum(), self.world_size()
        mini, micro = check_batch_sizes(len(ro), o.mini_batch_size, o.micro_batch_size)
        norm = None if reduce is None else (lambda t: reduce(t.clone()).clamp(min=1) / world)
        return micro_batches(ro, o.epochs, mini, micro, self.loss_cfg.agg, norm)

    def policy_loss(self, part: Rollout, adv: Tensor, ref_logp: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The `loss.name` policy loss of one micro-batch (touches only the policy)."""
        cfg = self.loss_cfg
        logp, extra = sequence_logprobs(self.policy, part, self.rollout_cfg.temperature, return_entropy=True,
                                        entropy_grad=cfg.ent_coef != 0)
        return POLICY_LOSSES.get(cfg.name)(
            logp, part.logprobs, adv, part.response_mask, ref_logp=ref_logp, entropy=extra["entropy"],
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.agg,
            max_len=cfg.max_len or self.rollout_cfg.max_new_tokens, beta=cfg.beta, kl_kind=cfg.kl_kind,
            ent_coef=cfg.ent_coef)

    def clip_and_step(self, opt: Any, max_norm: float | None, *, count: bool) -> None:
        """Clip the gradient norm, step, zero; advance global_step only when `count` (once per rollout)."""
        if max_norm:
            plugin = self.trainer.precision_plugin
            if type(plugin) is MixedPrecision and plugin.scaler is None:
                # bf16-mixed: no loss scaling to undo, but Lightning refuses to clip for fused optimizers
                Precision.clip_gradients(plugin, opt, max_norm, GradClipAlgorithmType.NORM)
            else:
                self.clip_gradients(opt, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        step(self, opt, count=count)

    def step_models(self, steps: list[tuple[Any, float | None, bool]], losses: dict[str, Tensor],
                    models: dict[str, torch.nn.Module]) -> None:
        """Clip and step each (optimizer, max_norm, count) in order, unless the non-finite guard skips this update:
        then every gradient is dropped and only a counted step runs (on no gradients: no weight moves), so
        global_step still advances once per rollout."""
        if self.guard.should_skip(losses, models, self.global_step + 1, self.any_rank()):
            for opt, _, count in steps:
                opt.zero_grad(set_to_none=True)
                if count:
                    step(self, opt, count=True)
            return
        for opt, max_norm, count in steps:
            self.clip_and_step(opt, max_norm, count=count)

    def log_step(self, metrics: dict[str, float], batch: dict[str, list]) -> None:
        """Log a rollout step's metrics (with the run's count of skipped updates) and step the LR schedule(s)."""
        metrics = {**metrics, "train/skipped_updates": float(self.guard.skipped)}
        self.log_dict(metrics, on_step=True, batch_size=len(batch["prompt"]))
        for sched in as_list(self.lr_schedulers()):
            sched.step()

    # ---- validation and the run around it ------------------------------------------------------------
    def validate_batch(self, batch: dict[str, list]) -> None:
        """Greedy completions of held-out prompts -> val/accuracy (exact task answer), val/reward, length."""
        with self.full_parameters(self.policy):
            completions, lengths = generate_text(self.policy, self.tokenizer, self.engine, batch["prompt"],
                                                 max_new_tokens=self.val_max_new_tokens,
                                                 max_prompt_length=self.rollout_cfg.max_prompt_length)
        columns = {k: v for k, v in batch.items() if k != "prompt"}
        self.val_metrics.update("val/accuracy", self.val_accuracy(batch["prompt"], completions, **columns))
        self.val_metrics.update("val/reward", self.reward_fn(batch["prompt"], completions, columns).total)
        self.val_metrics.update("val/response_length", lengths)
        if mixed := language_mixed_share(batch, completions):
            self.val_metrics.update("val/language_mixed", mixed)

    def on_fit_start(self) -> None:
        self.reward_fn.to(self.device)  # a reward model scores on the training device
        if self.device.type == "cpu":
            keep_freed_memory()

    def on_train_start(self) -> None:
        lines = plan_lines(type(self).__name__, self.trainer, self.rollout_cfg, self.optim_cfg, self.loss_cfg,
                           self.advantage_cfg.estimator, self.reward_fn.names,
                           self.reference_plan(), self.vocab_size())
        lines += self.extra_plan_lines() + lora_plan_lines(self.policy, self.lora_cfg, self.ref_is_base)
        if self.trainer.is_global_zero:
            print("\n".join(lines), flush=True)
        super().on_train_start()

    def reference_plan(self) -> str:
        if self.ref is None and not self.ref_is_base:
            return "no reference model"
        return "reference loaded, released between uses" if self._ref_release.releases(self.ref) else "reference loaded"

    def extra_plan_lines(self) -> list[str]:
        """Stage-specific lines of the plan printout."""
        return []

