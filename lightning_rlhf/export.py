"""`python -m lightning_rlhf export CKPT --out DIR`: the HF-format model(s) of any training checkpoint.

CKPT is a `step=N.ckpt` file, or a run directory / its `checkpoints/` folder (the newest complete checkpoint
there). Each checkpoint records how its trained models were loaded (`Stage.export_records`: loader kind,
source directory, dtype, LoRA options); export loads each the same way, puts the checkpoint's weights in
(strictly: every key must match) and writes it with the stage's own export (`export_hf`: LoRA merged or as
an adapter). The first model (the policy, or the reward model) goes to DIR, the others (PPO's critic) to
DIR/<name>. Simplified: the source directories the run started from must still exist (the checkpoint holds
the trained weights, not the tokenizer or the model config; under LoRA not the base weights either, which are
checked against the fingerprint the checkpoint recorded).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from lightning_rlhf.algorithms.resume import fingerprint as _fingerprint
from lightning_rlhf.command_registry import COMMANDS
from lightning_rlhf.errors import DataError, MissingFileError

TASKS = {"causal_lm": "causal_lm", "critic": "token_cls", "reward_model": "seq_cls"}


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file: `path` itself, or the newest `step=N.ckpt` in `path` or `path/checkpoints`."""
    from lightning_rlhf.callbacks.checkpoint import step_checkpoints

    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise MissingFileError(f"checkpoint '{path}' does not exist; pass a step=N.ckpt file or a run directory "
                               "(its checkpoints/ folder is searched)")
    found = step_checkpoints(path) or step_checkpoints(path / "checkpoints")
    if not found:
        raise MissingFileError(f"'{path}' holds no complete checkpoint (step=N.ckpt); runs write them to "
                               "<trainer.default_root_dir>/checkpoints unless trainer.enable_checkpointing is false")
    return found[-1][1]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents (CPU, weights only); a file that is not a checkpoint is a DataError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise DataError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
                        " it may be truncated: use an earlier step=N.ckpt") from e
    if not isinstance(ckpt, dict) or not ckpt.get("lightning_rlhf", {}).get("exports"):
        raise DataError(f"'{path}' has no lightning_rlhf model record: it was not written by a lightning_rlhf stage "
                        "(or by a version before checkpoints could be exported)")
    return ckpt


def rebuild(record: dict[str, Any], weights: dict[str, torch.Tensor],
            frozen: dict[str, Any] | None = None) -> tuple[torch.nn.Module, Any]:
    """(the model of `record` with this checkpoint's weights, its tokenizer). `frozen`: the identity of weights the
    checkpoint left out (LoRA base weights); they come from the source, which must still hold the same ones."""
    from lightning_rlhf.algorithms.resume import frozen_entries, same_fingerprint
    from lightning_rlhf.models import apply_lora, load_causal_lm, load_critic, load_reward_model, load_tokenizer

    kind, source = record["kind"], record["source"]
    if kind == "causal_lm":
        model = load_causal_lm(source, gguf_file=record.get("gguf_file"), dtype=record["dtype"])
    else:
        model = (load_critic if kind == "critic" else load_reward_model)(source, dtype=record["dtype"])
    model = apply_lora(model, record.get("lora"), TASKS[kind])
    prefix = record["attr"] + "."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if frozen is not None:
        base = frozen_entries(model, record["attr"])
        if set(base) != set(frozen["keys"]) or not same_fingerprint(frozen["fingerprint"],
                                                                    [*_fingerprint(base.values())]):
            raise DataError(f"the base weights now in '{source}' differ from those the run trained its adapters on "
                            "(the checkpoint keeps only the adapters); restore that directory, or export from a "
                            "run that saved its base weights")
        state.update({k[len(prefix):]: v for k, v in base.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"the checkpoint's '{record['attr']}' weights do not fit the model loaded from '{source}' "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                        f"{(missing or unexpected)[0]}); was that directory replaced since the run?")
    return model, load_tokenizer(record["tokenizer"], padding_side=record.get("padding_side", "left"))


def export_checkpoint(ckpt_path: str | Path, out: str | Path, lora_export: str | None = None) -> list[Path]:
    """Write every model of the checkpoint as an HF directory (see the module docstring); their paths."""
    from lightning_rlhf.algorithms.stage import export_hf
    from lightning_rlhf.models.lora import as_lora

    path = find_checkpoint(ckpt_path)
    ckpt = read_checkpoint(path)
    written = []
    frozen = ckpt["lightning_rlhf"].get("frozen", {})
    for i, record in enumerate(ckpt["lightning_rlhf"]["exports"]):
        model, tokenizer = rebuild(record, ckpt["state_dict"], frozen.get(record["attr"]))
        lora = as_lora(record["lora"]) if record.get("lora") else None
        if lora is not None and lora_export:
            lora = as_lora({**record["lora"], "export": lora_export})
        target = Path(out) if i == 0 else Path(out) / record["attr"]
        written.append(export_hf(model, tokenizer, str(target), None, lora))
        print(f"[lightning_rlhf] {record['attr']} of {path} (step {ckpt.get('global_step')}) -> {target}")
    return written


@COMMANDS.register("export")
def export_command(argv: list[str]) -> list[Path]:
    """Write the HF-format policy (and critic, or the reward model) of a training checkpoint."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf export", description=export_command.__doc__)
    p.add_argument("checkpoint", help="a step=N.ckpt file, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="output dir of the first model (others go to OUT/<name>)")
    p.add_argument("--lora-export", choices=["merged", "adapter"], default=None,
                   help="with LoRA: merged weights or the adapter (default: the run's lora.export)")
    a = p.parse_args(argv)
    return export_checkpoint(a.checkpoint, a.out, a.lora_export)
