"""What a stage adds to a Lightning checkpoint so a resumed run continues exactly (`Stage` calls these).

Lightning already saves the trained weights, optimizers, LR schedulers and loop progress; the train loader's
position is the sampler's (`data/samplers.py`). Here:
  - RNG states (torch CPU, CUDA, Python `random`, NumPy) at the save, restored just before the next training
    batch, so sampling without a key, mini-batch shuffles and dropout draw what the uninterrupted run drew;
  - frozen weights (the reference model; with LoRA, the base weights under the adapters) are dropped from the
    checkpoint and replaced by their identity: source, dtype, the keys and a fingerprint of the weights; on
    resume the run's own frozen weights must match it (a LoRA checkpoint of a 135M model: 60 MB, not 600);
  - the stage's extra state (`Stage.resume_state`: validation history, PPO's adaptive KL coefficient, the
    count of skipped updates).
Simplified: the fingerprint is (element count, sum, sum of squares) in float64, cheap and enough to tell
two checkpoints apart, not a cryptographic hash; CUDA states are restored per visible device.
"""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch

from lightning_rlhf.errors import ConfigError

KEY = "lightning_rlhf"


def rng_state() -> dict[str, Any]:
    """The global RNG states of this process, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors and numbers: loadable weights_only
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def fingerprint(tensors: Iterable[torch.Tensor]) -> list[float]:
    """[number of elements, sum, sum of squares] over `tensors`, in float64."""
    tensors = list(tensors)
    n = float(sum(t.numel() for t in tensors))
    return [n, float(sum(t.double().sum() for t in tensors)), float(sum(t.double().square().sum() for t in tensors))]


def frozen_entries(module: torch.nn.Module, prefix: str, everything: bool = False) -> dict[str, torch.Tensor]:
    """`module`'s state-dict entries as `prefix.key`: every one (`everything`, a frozen model), or those that are
    parameters without gradient (the base weights under LoRA adapters; tied weights under each of their names),
    except PEFT's frozen copy of a trained head (`modules_to_save`), which is freshly initialised at load time and
    so not reproducible from the source: it stays in the checkpoint (a few KB)."""
    entries = module.state_dict(keep_vars=True)
    return {f"{prefix}.{k}": v.detach() for k, v in entries.items()
            if everything or (isinstance(v, torch.nn.Parameter) and not v.requires_grad
                              and ".original_module." not in k)}  # PEFT's frozen twin of a fresh (random) head


def identity(entries: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """What a checkpoint records in place of frozen weights: source, dtype, keys and fingerprint."""
    dtype = str(next(iter(entries.values())).dtype) if entries else "none"
    return {"source": source, "dtype": dtype, "keys": sorted(entries), "fingerprint": fingerprint(entries.values())}


def drop_frozen(checkpoint: dict[str, Any], identities: dict[str, dict[str, Any]]) -> None:
    """Remove each identity's keys from the checkpoint's weights and record the identities in their place."""
    weights = checkpoint.get("state_dict", {})
    for ident in identities.values():
        for key in ident["keys"]:
            weights.pop(key, None)
    checkpoint.setdefault(KEY, {})["frozen"] = identities


def restore_frozen(checkpoint: dict[str, Any], frozen: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]],
                   path: str = "the checkpoint") -> None:
    """Put this run's frozen weights back into the checkpoint's weights after checking each matches the recorded
    identity (so strict loading sees every key); different weights are an error naming both sources."""
    recorded = checkpoint.get(KEY, {}).get("frozen", {})
    weights = checkpoint.setdefault("state_dict", {})
    for name, (entries, ident) in frozen.items():
        was = recorded.get(name)
        if was is None:
            continue  # not dropped when saved (e.g. written before this record existed): load it as saved
        if not same_fingerprint(was["fingerprint"], ident["fingerprint"]):
            raise ConfigError(
                f"{path} was trained against the frozen {name} weights from '{was['source']}' "
                f"(dtype {was['dtype']}), but this run loaded '{ident['source']}' (dtype {ident['dtype']}) "
                f"whose weights differ; resume with the same {name} model as the run that wrote it")
        weights.update({k: v for k, v in entries.items() if k not in weights})


def same_fingerprint(a: list[float], b: list[float]) -> bool:
    return a[0] == b[0] and all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(a[1:], b[1:]))
