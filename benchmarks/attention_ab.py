"""The fused decode attention kernel at two versions of `rollout/decode_kernels.c`, side by side.

    python benchmarks/attention_ab.py --base HEAD~1 [--repeats 6]

Builds `decode_kernels.c` as it is in the working tree and as it was at git revision `--base` (the same compiler
and flags as `rollout/cpu_kernels.py`), and times `lr_attend` (and `lr_attend_bf16`, where both versions have
it) on the caches of a decode step: SmolLM2-135M at 64 rows (9 query heads over 3 key/value heads of 64, 30
layers, 108 of 176 columns written) and the tiny Llama at 32 rows (4 heads of 32, 4 layers, 70 of 83 columns).
Each pass goes through every layer's cache, as a decode step does, so SmolLM2's (160-320 MB) come from memory and
the tiny model's (11 MB) stay in the last-level cache. The two versions alternate pass by pass (this machine's
speed drifts); prints the mean microseconds per call of each, the ratio and their largest difference.
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

SHAPES = {  # rows, query heads, kv heads, head size, layers, columns, width
    "smollm2-135m": (64, 9, 3, 64, 30, 176, 108),
    "tiny": (32, 4, 4, 32, 4, 83, 70),
}


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
    libs = {"base": build(base_source, "base"), "new": build(cpu_kernels.SOURCE.read_text(), "new")}
    print(f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; base {a.base}")
    for dtype in (torch.float32, torch.bfloat16):
        symbol = "lr_attend" if dtype == torch.float32 else "lr_attend_bf16"
        if not all(hasattr(lib, symbol) for lib in libs.values()):
            print(f"{dtype}: {a.base} has no {symbol}; skipped")
            continue
        fns = {side: getattr(lib, symbol) for side, lib in libs.items()}
        for fn in fns.values():
            fn.argtypes, fn.restype = cpu_kernels.SIGNATURES["lr_attend"], None
        for model, (n, heads, kv, hd, layers, cols, width) in SHAPES.items():
            torch.manual_seed(0)
            q = torch.randn(n, heads, hd) * 0.3
            caches = [(torch.randn(n, kv, hd, cols).to(dtype), torch.randn(n, kv, cols, hd).to(dtype))
                      for _ in range(layers)]
            bias = torch.zeros(n, cols)
            bias[0, :5] = float("-inf")  # one left-padded prompt
            outs = {side: torch.empty(n, heads, hd, dtype=dtype) for side in fns}
            seconds = {side: 0.0 for side in fns}
            for repeat in range(a.repeats + 1):  # the first pass of each warms up
                for side, fn in fns.items():
                    for kc, vc in caches:
                        start = time.perf_counter()
                        fn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), bias.data_ptr(), outs[side].data_ptr(), n, kv,
                           heads // kv, hd, cols, width)
                        if repeat:
                            seconds[side] += time.perf_counter() - start
            us = {side: s / a.repeats / layers * 1e6 for side, s in seconds.items()}
            diff = float((outs["base"].float() - outs["new"].float()).abs().max())
            print(f"{model:14s} {str(dtype):15s} base {us['base']:7.1f} us  new {us['new']:7.1f} us  "
                  f"x{us['base'] / us['new']:.2f}  max diff {diff:.1e}")


if __name__ == "__main__":
    main()
