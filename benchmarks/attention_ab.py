"""The fused decode attention kernel at two versions of `rollout/decode_kernels.c`, side by side.

    python benchmarks/attention_ab.py --base HEAD~1 [--repeats 6]

Builds `decode_kernels.c` as it is in the working tree and as it was at git revision `--base` (the same compiler
and flags as `rollout/cpu_kernels.py`), and times `lr_attend` (and `lr_attend_bf16`, where both versions have
it) on the caches of a decode step: SmolLM2-135M at 64 rows (8 per prompt of 48 tokens, as benchmarks/rollout.py
samples; 9 query heads over 3 key/value heads of 64, 30 layers, 60 of 128 new columns written) and the tiny Llama
at 32 rows (4 per prompt of 51 tokens, as the GRPO benchmark; 4 heads of 32, 4 layers, 19 of 32 new columns).
Each pass goes through every layer's cache, as a decode step does. A version whose kernel takes one cache per
row (before the prompt's keys and values were shared by its rows) gets each row's copy of its prompt's columns
followed by its own; the newer kernel also writes the new token's key and value into the cache (which the
older one left to `lr_rope_store`), so it is timed doing more. In bfloat16 on a CPU with bfloat16 dot products the
newer kernel rounds the queries and weights to bfloat16 (as the eager step does), so the outputs differ by that.
The two versions alternate pass by pass (this machine's speed drifts); prints the mean microseconds per call of
each, the ratio and their largest difference. `--base` is a revision before 06d1d1a (one cache per row) or from
e0b6d64 on (the calling convention of today's kernel); those between had other cache layouts.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_rlhf.algorithms.runtime import cpu_model  # noqa: E402
from lightning_rlhf.rollout import cpu_kernels  # noqa: E402

SHAPES = {  # rows, query heads, kv heads, head size, layers, prompt length, new columns, new written, rows per prompt
    "smollm2-135m": (64, 9, 3, 64, 30, 48, 128, 60, 8),
    "tiny": (32, 4, 4, 32, 4, 51, 32, 19, 4),
}
PER_ROW = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 6


def caller(lib: ctypes.CDLL, symbol: str, shared: bool):
    """`symbol` of `lib` as a function of (q, the caches, out) -> None, for either calling convention."""
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = (cpu_kernels.SIGNATURES["lr_attend"] if shared else PER_ROW), None
    if shared:
        return lambda q, c, out: fn(q.data_ptr(), *(t.data_ptr() for t in c["shared"]), out.data_ptr(), *c["dims"])
    return lambda q, c, out: fn(q.data_ptr(), *(t.data_ptr() for t in c["per_row"]), out.data_ptr(), *c["row_dims"])


def layer_caches(n, heads, kv, hd, plen, cols, width, group, dtype) -> dict:
    """One layer's caches in both layouts: the prompt's part once per prompt, in the kernels' cache layout (the
    engine's now), and each row's copy of its prompt's, keys transposed (before)."""
    prompts = n // group
    prompt_keys, prompt_values = (torch.randn(prompts, kv, plen, hd).to(dtype) for _ in range(2))
    keys, values = (torch.randn(n, kv, cols, hd).to(dtype) for _ in range(2))
    pk, pv = cpu_kernels.cache_keys(prompt_keys), cpu_kernels.cache_values(prompt_values)
    k, v = cpu_kernels.cache_keys(keys), cpu_kernels.cache_values(values)
    bias = torch.zeros(prompts, plen)
    bias[0, :5] = float("-inf")  # one left-padded prompt
    of_row = torch.arange(prompts).repeat_interleave(group)
    row_bias = torch.cat([bias[of_row], torch.zeros(n, cols)], -1)
    per_row = (torch.cat([prompt_keys[of_row], keys], 2).transpose(2, 3).contiguous(),
               torch.cat([prompt_values[of_row], values], 2), row_bias)
    new = (keys[:, :, width - 1].contiguous(), values[:, :, width - 1].clone())  # written at column width - 1 again
    return {"shared": (pk, pv, bias, of_row, k, v, *new),
            "dims": (kv * hd, plen, pk.shape[2] * 32, cols, width, n, kv, heads // kv, hd),
            "per_row": per_row, "row_dims": (n, kv, heads // kv, hd, plen + cols, plen + width)}


def build(source: str, name: str) -> ctypes.CDLL:
    """`source` compiled as the engine compiles its kernels (`cpu_kernels.build`), loaded."""
    folder = Path(tempfile.mkdtemp())
    (folder / "k.c").write_text(source)
    cpu_kernels.build(os.environ.get("CC") or "cc", folder / f"{name}.so", folder / "k.c")
    return ctypes.CDLL(str(folder / f"{name}.so"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    base_source = subprocess.run(["git", "show", f"{a.base}:lightning_rlhf/rollout/decode_kernels.c"], cwd=ROOT,
                                 check=True, capture_output=True, text=True).stdout
    sources = {"base": base_source, "new": cpu_kernels.SOURCE.read_text()}
    libs = {side: build(source, side) for side, source in sources.items()}
    shared = {side: "prompt_of" in source for side, source in sources.items()}
    print(f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; base {a.base}")
    for dtype in (torch.float32, torch.bfloat16):
        symbol = "lr_attend" if dtype == torch.float32 else "lr_attend_bf16"
        if not all(hasattr(lib, symbol) for lib in libs.values()):
            print(f"{dtype}: {a.base} has no {symbol}; skipped")
            continue
        fns = {side: caller(lib, symbol, shared[side]) for side, lib in libs.items()}
        for model, (n, heads, kv, hd, layers, plen, cols, width, group) in SHAPES.items():
            torch.manual_seed(0)
            q = torch.randn(n, heads, hd) * 0.3
            caches = [layer_caches(n, heads, kv, hd, plen, cols, width, group, dtype) for _ in range(layers)]
            outs = {side: torch.empty(n, heads, hd, dtype=dtype) for side in fns}
            seconds = {side: 0.0 for side in fns}
            for repeat in range(a.repeats + 1):  # the first pass of each warms up
                for side, fn in fns.items():
                    for c in caches:
                        start = time.perf_counter()
                        fn(q, c, outs[side])
                        if repeat:
                            seconds[side] += time.perf_counter() - start
            us = {side: s / a.repeats / layers * 1e6 for side, s in seconds.items()}
            diff = float((outs["base"].float() - outs["new"].float()).abs().max())
            print(f"{model:14s} {str(dtype):15s} base {us['base']:7.1f} us  new {us['new']:7.1f} us  "
                  f"x{us['base'] / us['new']:.2f}  max diff {diff:.1e}")


if __name__ == "__main__":
    main()
