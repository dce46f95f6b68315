"""Packed float32 decode weights: the per-shape probe's choice against packing every large weight, side by side.

    python benchmarks/decode_packing.py [--model checkpoints/smollm2-135m-instruct] [--rows 64] [--repeats 3]

Builds the static engine's `LeanLlama` twice from one model (a missing `--model` directory: a random-init
model of SmolLM2's shape): once with `PackedLinear.pays` left to `packing_pays` for every shape (the probe times
one weight called over and over), once as the engine now does it (float32 weights of ALWAYS_PACK_BYTES or more
packed without a probe). Prints which projections each packs, then times 63 decode steps per repeat, the two
alternating step by step (this machine's speed drifts), and the ratio of their mean ms per step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rollout import SMOLLM2, load  # noqa: E402
from lightning_rlhf.algorithms.runtime import cpu_model, keep_freed_memory  # noqa: E402
from lightning_rlhf.models import cpu_linear  # noqa: E402
from lightning_rlhf.rollout.lean_llama import LeanLlama  # noqa: E402


def packing(lean: LeanLlama) -> str:
    layer = lean.layers[0]
    sides = {"qkv": layer.qkv.linears, "o": [layer.o], "gate_up": layer.gate_up.linears, "down": [layer.down],
             "lm_head": [lean.lm_head]}
    return ", ".join(f"{k} {'+'.join('packed' if p.packed else 'F.linear' for p in v)}" for k, v in sides.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    keep_freed_memory()
    what, model = load(a.model, SMOLLM2)
    g, prompt, vocab = 8, 48, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 1, (max(1, a.rows // g), prompt), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    rows = ids.shape[0] * g
    tokens, positions = torch.randint(3, vocab - 1, (rows,), generator=gen), mask.sum(-1).repeat_interleave(g)
    with torch.no_grad():
        bound = cpu_linear.ALWAYS_PACK_BYTES
        cpu_linear.ALWAYS_PACK_BYTES = 1 << 62  # every shape to the probe
        versions = {"probe": LeanLlama.from_model(model, torch.float32, rows=rows)}
        cpu_linear.ALWAYS_PACK_BYTES = bound
        versions["engine"] = LeanLlama.from_model(model, torch.float32, rows=rows)
        for name, lean in versions.items():
            print(f"{name}: {packing(lean)}")
        _, kvs = versions["probe"].prefill(ids, mask)
        times = {name: 0.0 for name in versions}
        for _ in range(a.repeats):
            caches = {name: lean.new_cache(kvs, mask, g, 64) for name, lean in versions.items()}
            for i in range(63):
                order = list(versions.items())
                for name, lean in order if i % 2 else order[::-1]:
                    start = time.perf_counter()
                    lean.decode(tokens, positions + i, caches[name], prompt + i)
                    times[name] += time.perf_counter() - start
    ms = {name: 1000 * t / (63 * a.repeats) for name, t in times.items()}
    print(f"{what}, float32, {rows} rows; {cpu_model()}")
    print(f"  probe {ms['probe']:.1f} ms/step, engine {ms['engine']:.1f} ms/step, probe / engine "
          f"{ms['probe'] / ms['engine']:.3f}")


if __name__ == "__main__":
    main()
