"""What a stage adds to a Lightning checkpoint so a resumed run continues exactly (`Stage` calls these).

Lightning already saves the trained weights, optimizers, LR schedulers and loop progress; the train loader's
position is the sampler's (`data/samplers.py`). Here:
  - RNG states (torch CPU, CUDA, Python `random`, NumPy) at the save, restored just before the next training
    batch, so sampling without a key, mini-batch shuffles and dropout draw what the uninterrupted run drew;
  - frozen models (the reference) are dropped from the checkpoint and replaced by their identity: source,
    dtype and a fingerprint of the weights; on resume the run's own frozen model must match it;
  - the stage's extra state (`Stage.resume_state`: validation history, PPO's adaptive KL coefficient, the
    count of skipped updates).
Simplified: the fingerprint is (parameter count, sum, sum of squares) in float64, cheap and enough to tell
two checkpoints apart, not a cryptographic hash; CUDA states are restored per visible device.
"""

from __future__ import annotations

import random
from typing import Any

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
def fingerprint(model: torch.nn.Module) -> list[float]:
    """[number of elements, sum, sum of squares] over every parameter and buffer, in float64."""
    tensors = list(model.state_dict().values())
    n = float(sum(t.numel() for t in tensors))
    return [n, float(sum(t.double().sum() for t in tensors)), float(sum(t.double().square().sum() for t in tensors))]


def drop_frozen(checkpoint: dict[str, Any], prefixes: dict[str, dict[str, Any]]) -> None:
    """Remove the weights under each `prefix.` from the checkpoint; record `identity` in their place."""
    weights = checkpoint.get("state_dict", {})
    for prefix in prefixes:
        for key in [k for k in weights if k.startswith(prefix + ".")]:
            del weights[key]
    checkpoint.setdefault(KEY, {})["frozen"] = prefixes


def restore_frozen(checkpoint: dict[str, Any], frozen: dict[str, tuple[torch.nn.Module, dict[str, Any]]],
                   path: str = "the checkpoint") -> None:
    """Put this run's frozen models back into the checkpoint's weights after checking each matches the recorded
    identity (so strict loading sees every key); a different reference is an error naming both sources."""
    recorded = checkpoint.get(KEY, {}).get("frozen", {})
    weights = checkpoint.setdefault("state_dict", {})
    for prefix, (model, identity) in frozen.items():
        was = recorded.get(prefix)
        if was is not None and not _same(was["fingerprint"], identity["fingerprint"]):
            raise ConfigError(
                f"{path} was trained against the frozen {prefix} model from '{was['source']}' "
                f"(dtype {was['dtype']}), but this run loaded '{identity['source']}' (dtype {identity['dtype']}) "
                f"whose weights differ; resume with the same {prefix} model as the run that wrote it")
        if was is None and any(k.startswith(prefix + ".") for k in weights):
            continue  # an older checkpoint that still holds the weights: load them as saved
        weights.update({f"{prefix}.{k}": v for k, v in model.state_dict().items()})


def _same(a: list[float], b: list[float]) -> bool:
    return a[0] == b[0] and all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(a[1:], b[1:]))
