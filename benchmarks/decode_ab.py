"""The static engine's decode step at two versions of `rollout/lean_llama.py`, interleaved step by step.

    python benchmarks/decode_ab.py --base HEAD~1 [--model checkpoints/smollm2-135m-instruct] [--rows 64]
                                   [--dtype bfloat16] [--repeats 3]

Loads `lean_llama.py` as it is in the working tree and as it was at git revision `--base`, builds both from
the same model (a missing `--model` directory: a random-init model of SmolLM2's shape), prefills the same
prompts (8 samples per prompt, 48 tokens, one prompt left-padded), and times 63 decode steps, alternating one
step of each version. Alternating step by step is the point: this machine's speed drifts by 10% or more
within minutes, which swamps a few percent when the two versions run one after the other. Prints the mean ms per step of each, their ratio, and the largest logit difference between
them after the first and the eleventh step. Both versions call the working tree's `cpu_kernels`, whose functions
changed in e0b6d64 (the shared-prompt cache): compare with an earlier revision under LIGHTNING_RLHF_KERNELS=0.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.rollout import SMOLLM2, load  # noqa: E402
from lightning_rlhf.algorithms.runtime import cpu_model, keep_freed_memory  # noqa: E402
from lightning_rlhf.rollout import lean_llama as current  # noqa: E402


def module_at(revision: str):
    """`lightning_rlhf/rollout/lean_llama.py` at `revision`, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:lightning_rlhf/rollout/lean_llama.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "lean_llama_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lean_llama_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    keep_freed_memory()
    base = module_at(a.base)
    what, model = load(a.model, SMOLLM2)  # a missing directory: a random-init model of SmolLM2's shape
    dtype, vocab, g, prompt = getattr(torch, a.dtype), model.config.vocab_size, 8, 48
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 1, (max(1, a.rows // g), prompt), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    rows = ids.shape[0] * g
    tokens = torch.randint(3, vocab - 1, (rows,), generator=gen)
    positions = mask.sum(-1).repeat_interleave(g)
    times = {"base": [], "current": []}
    with torch.no_grad():
        versions = {name: (mod, mod.LeanLlama.from_model(model, dtype, rows=rows))
                    for name, mod in (("base", base), ("current", current))}
        prefilled = {name: lean.prefill(ids, mask) for name, (_, lean) in versions.items()}
        for repeat in range(a.repeats):
            caches = {name: lean.new_cache(prefilled[name][1], mask, g, 64) if hasattr(lean, "new_cache")
                      else mod.StaticKVCache(lean, prefilled[name][1], mask, g, prompt + 64)
                      for name, (mod, lean) in versions.items()}
            for i in range(63):
                logits = {}
                for name, (_, lean) in versions.items():
                    start = time.perf_counter()
                    logits[name] = lean.decode(tokens, positions + i, caches[name], prompt + i)
                    times[name].append(time.perf_counter() - start)
                if repeat == 0 and i in (0, 10):
                    diff = (logits["base"] - logits["current"]).abs().max().item()
                    print(f"step {i + 1}: max |logit difference| {diff:.3g}")
    mean = {name: 1000 * sum(t) / len(t) for name, t in times.items()}
    print(f"{what}, {a.dtype}, {rows} rows; {cpu_model()}; base {a.base}")
    print(f"  base {mean['base']:.3f} ms/step, current {mean['current']:.3f} ms/step, "
          f"base / current {mean['base'] / mean['current']:.3f}")


if __name__ == "__main__":
    main()
