"""LoRA adapters through PEFT: the `lora` option of every stage, applying it, and exporting the result.

`lora: {r: 16, alpha: 32}` in a stage's `init_args` wraps the loaded model with PEFT's LoRA (`apply_lora`): the
base weights are frozen and only the low-rank adapters (Hu et al. 2021: W + alpha/r * B A, B starting at 0)
train, plus, for the reward model and PPO's critic, the scalar `score` head (PEFT `modules_to_save`, so the
head is saved with the adapters). `lora: null` (the default) trains every weight as before.

- The frozen reference of GRPO and PPO is the policy's own base weights with the adapters switched off
  (`adapters_disabled`), so no second copy of the model is loaded; at step 0, B = 0 makes it exact.
- Forward passes that need the plain HF model (logits_to_keep, a KV cache, the score head's body) run on
  `unwrap_peft(model)`: the base model with the LoRA layers injected, which applies the adapters.
- The lean rollout engine reads weights directly; `lora_parts` gives it each projection's base layer and its
  active adapters, and `lora_unsupported_reason` names what it cannot run (DoRA, LoRA on embeddings, ...).
- Export (`export_lora`): `merged` (default) writes a plain HF directory (the adapters merged into a copy of the
  weights), which later stages and `from_pretrained` load as usual; `adapter` writes PEFT's adapter directory
  (adapter_config.json + adapter_model.safetensors, and the tokenizer). Load that with
  `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` (the base is the `base_model_name_or_path` of
  adapter_config.json: the stage's `policy` as written, so a relative path is relative to where it ran), or
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)`; `load_causal_lm(dir)` (a
  later stage's `policy:`) loads it merged.
Simplified: one adapter per model ("default"); the "all-linear" choice is ours (every nn.Linear but the output
head and the score/classifier head, for every task type); peft is imported only when LoRA is used.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_rlhf.errors import ConfigError

EXPORTS = ("merged", "adapter")
TASKS = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}
HEADS = ("lm_head", "score", "classifier")  # never LoRA targets; the score/classifier head trains in full


@dataclass(frozen=True)
class LoraOptions:
    """LoRA through PEFT (`lora: null` = train every weight).

    Args:
        r: rank of the adapters (> 0).
        alpha: scaling numerator: the update is alpha / r * B A.
        dropout: dropout on the adapters' input (SFT, reward model; the RL stages set every dropout to 0).
        target_modules: "all-linear" (every nn.Linear of the body: q/k/v/o and gate/up/down in a Llama) or a
            list of module names, e.g. [q_proj, v_proj].
        modules_to_save: further modules trained in full and saved with the adapters (the reward model's and
            critic's score head is always one).
        export: merged (a plain HF directory, the default) or adapter (PEFT's adapter directory).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    export: str = "merged"


def as_lora(value: LoraOptions | dict[str, Any] | None) -> LoraOptions | None:
    """`value` as LoraOptions (None stays None: LoRA off); a dict's keys are checked."""
    if value is None or isinstance(value, LoraOptions):
        return value
    if isinstance(value, dict):
        valid = set(LoraOptions.__dataclass_fields__)
        if bad := sorted(set(value) - valid):
            raise ConfigError(f"lora: unknown keys {bad}; valid keys: {sorted(valid)}")
        return LoraOptions(**value)
    raise ConfigError(f"lora: expected a mapping of {sorted(LoraOptions.__dataclass_fields__)} or null, "
                      f"got {type(value).__name__}")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the model's nn.Linear modules that LoRA may target (heads excluded)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not out}
    return sorted(names - set(HEADS))


def check_lora(options: LoraOptions, model: torch.nn.Module) -> list[str]:
    """Fail with a ConfigError naming the bad value and the fix; return the target module names."""
    o = options
    if not (isinstance(o.r, int) and o.r > 0):
        raise ConfigError(f"lora.r={o.r!r}: the rank must be a positive integer, e.g. 8 or 16")
    if not o.alpha > 0:
        raise ConfigError(f"lora.alpha={o.alpha!r}: must be > 0 (the update is scaled by alpha / r; try 2 * r)")
    if not 0.0 <= o.dropout < 1.0:
        raise ConfigError(f"lora.dropout={o.dropout!r}: must be in [0, 1)")
    if o.export not in EXPORTS:
        raise ConfigError(f"lora.export={o.export!r} is not one of {list(EXPORTS)}")
    available = linear_module_names(model)
    if o.target_modules == "all-linear":
        return available
    targets = [o.target_modules] if isinstance(o.target_modules, str) else list(o.target_modules)
    if not targets or (bad := [t for t in targets if t not in available]):
        raise ConfigError(f"lora.target_modules: {bad if targets else 'empty'} not among the linear modules of "
                          f"{type(model).__name__}: {available} (or use \"all-linear\")")
    return targets


def apply_lora(model: torch.nn.Module, options: LoraOptions | dict | None, task: str = "causal_lm") -> torch.nn.Module:
    """`model` wrapped as a PEFT LoRA model (base frozen, adapters trainable), or unchanged when `options` is
    None. `task`: causal_lm, seq_cls (reward model) or token_cls (critic); the latter two keep their score
    head trainable."""
    options = as_lora(options)
    if options is None:
        return model
    from peft import LoraConfig, get_peft_model

    targets = check_lora(options, model)
    heads = [h for h in HEADS[1:] if task != "causal_lm" and isinstance(getattr(model, h, None), torch.nn.Module)]
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=targets,
                        modules_to_save=sorted(set(heads) | set(options.modules_to_save or [])) or None,
                        task_type=TASKS[task], bias="none")
    return get_peft_model(model, config)


def is_peft(model: Any) -> bool:
    """True for a PEFT wrapper (PeftModel and its task subclasses)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_peft(model: Any) -> Any:
    """The HF model inside a PEFT wrapper (its LoRA layers injected, so it applies them); others unchanged."""
    return model.get_base_model() if is_peft(model) else model


def adapters_disabled(model: Any) -> contextlib.AbstractContextManager:
    """A context in which a PEFT model computes with its base weights only (the LoRA reference)."""
    return model.disable_adapter() if is_peft(model) else contextlib.nullcontext()


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_plan_lines(model: torch.nn.Module, options: LoraOptions | None, ref_is_base: bool) -> list[str]:
    """The plan printout's LoRA line: rank, trainable share, where the reference comes from; [] without LoRA."""
    if options is None:
        return []
    trainable, total = trainable_parameters(model)
    ref = "; reference = base weights, adapters off (no second copy)" if ref_is_base else ""
    return [f"  lora                  r {options.r}, alpha {options.alpha}, {options.target_modules}; trainable "
            f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%){ref}"]


def _is_lora_linear(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), torch.nn.Linear)


def lora_parts(module: torch.nn.Module) -> tuple[torch.nn.Linear, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """(the plain nn.Linear, [(A, B, scaling) of each active adapter]) of a projection, as PEFT's forward uses
    them: none when adapters are disabled or merged into the base weights; a plain nn.Linear has none."""
    if not _is_lora_linear(module):
        return module, []
    if module.disable_adapters or module.merged:
        return module.base_layer, []
    active = [a for a in module.active_adapters if a in module.lora_A]
    return module.base_layer, [(module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a]) for a in active]


def lora_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why a weight-reading engine cannot run this (unwrapped) model's PEFT layers: anything but plain LoRA on
    nn.Linear (DoRA and other variants, a LoRA bias, LoRA on embeddings, modules_to_save copies). None: it can."""
    for name, m in model.named_modules():
        if not type(m).__module__.startswith("peft.") or m is model:
            continue
        if not _is_lora_linear(m):
            return f"PEFT layer {name} ({type(m).__name__}) is not LoRA on a linear layer"
        keys = ("lora_variant", "use_dora", "lora_bias")
        if any(getattr(m, key, {}).get(a) for key in keys for a in m.active_adapters):
            return f"the LoRA adapter of {name} is a variant (DoRA, ...) or has a bias"
    return None


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain HF model equal to `model` with its adapters merged into the weights; `model` is untouched."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def export_lora(model: Any, tokenizer: Any, out_dir: str | Path, mode: str, save_hf: Any) -> Path:
    """Write a PEFT model: `merged` through `save_hf` (a plain HF dir), or `adapter` (PEFT's adapter dir +
    tokenizer); see the module docstring for how to load either. Both write atomically (a failed write keeps the
    previous directory and raises NotWritableError, see `loading.write_dir_atomically`)."""
    if mode == "merged":
        return save_hf(merged_copy(model), tokenizer, out_dir)
    from lightning_rlhf.models.files import write_dir_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir_atomically(out_dir, write)


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter directory (adapter_config.json and no config.json of a full model)."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def load_adapter_merged(path: str | Path, dtype: Any) -> torch.nn.Module:
    """A causal LM from a PEFT adapter directory: its base model (read from adapter_config.json) with the
    adapters merged in."""
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=dtype).merge_and_unload()
