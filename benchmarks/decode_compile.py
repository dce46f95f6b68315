"""Would torch.compile speed up the static engine's decode step on a CPU? One decoder layer compiled (inductor),
against the engine's eager decode, side by side in one process.

    python benchmarks/decode_compile.py [--model checkpoints/tiny-base | smollm2] [--rows 64] [--dtype bfloat16]

Compiling the whole 30-layer decode step of SmolLM2 did not finish in 10 minutes on 2 cores, so this compiles
one layer's function (the same graph for every layer, compiled once). oneDNN's packed linear is wrapped in a
custom op that inductor leaves alone (its own lowering of that op fails). The compiled layer attends over
every cache column with a mask instead of slicing the written ones, so its shapes do not change from token to
token; "eager, full width" is that same function uncompiled, to separate the two effects. Prints the median
ms per decode step, the compile time, and the largest logit difference from the eager step on the same
inputs. Results: benchmarks/RESULTS.md ("torch.compile of the decode layer").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.rollout import SMOLLM2, load  # noqa: E402
from lightning_rlhf.algorithms.runtime import cpu_model  # noqa: E402
from lightning_rlhf.rollout.lean_llama import LeanLlama, StaticKVCache  # noqa: E402


@torch.library.custom_op("lightning_rlhf_bench::packed_linear", mutates_args=())
def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, bias, out_features):
    return x.new_empty(x.shape[0], out_features)


def opaque_call(self, x: Tensor) -> Tensor:
    """`PackedLinear.__call__` through the custom op, so inductor treats the matmul as a black box."""
    if not self.packed:
        return F.linear(x, self.weight, self.bias)
    out = packed_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.out_features)
    return out.view(*x.shape[:-1], self.out_features)


def layer_step(lean: LeanLlama, layer, x, cos, sin, kc, vc, column: Tensor, bias: Tensor) -> Tensor:
    """One decoder layer for one token per row, attending over all cache columns (`bias` masks the unwritten)."""
    n, hd, rep = x.shape[0], lean.head_dim, lean.heads // lean.kv_heads
    q, k, v = lean._qkv(layer, lean._rms(x, layer.ln1), cos, sin)
    kc.index_copy_(3, column, k.transpose(2, 3))
    vc.index_copy_(2, column, v)
    scores = torch.matmul(q.reshape(n, lean.kv_heads, rep, hd), kc)  # q comes pre-scaled (`LeanLlama.rope`)
    out = torch.matmul((scores + bias).softmax(dim=-1, dtype=torch.float32).to(vc.dtype), vc)
    return lean._mlp_block(layer, x + layer.o(out.reshape(n, 1, -1)))


def full_width_decode(lean: LeanLlama, step, tokens: Tensor, positions: Tensor, cache: StaticKVCache,
                      column: int) -> Tensor:
    cos, sin = lean.rope(positions[:, None])
    cols = cache.kv[0][1].shape[2]
    bias = torch.where(torch.arange(cols) <= column, 0.0, float("-inf")).expand(tokens.shape[0], cols)
    bias = (bias if cache.bias is None else bias + cache.bias)[:, None, None, :]
    x, col = F.embedding(tokens[:, None], lean.embed), torch.tensor([column])
    for layer, (kc, vc) in zip(lean.layers, cache.kv):
        x = step(lean, layer, x, cos, sin, kc, vc, col, bias)
    return lean.logits(x[:, 0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="an HF dir, or smollm2 (random init of its shape)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    from lightning_rlhf.models import cpu_linear

    cpu_linear.PackedLinear.__call__ = opaque_call  # same math; only what inductor sees changes
    what, model = load(a.model, SMOLLM2 if a.model == "smollm2" else None)
    dtype, vocab = getattr(torch, a.dtype), model.config.vocab_size
    lean = LeanLlama.from_model(model, dtype, a.rows, fused=False)  # torch's kernels, as compiled
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 1, (a.rows, a.prompt), generator=g)
    mask = torch.ones_like(ids)
    compiled = torch.compile(layer_step, dynamic=False)
    with torch.no_grad():
        _, kvs = lean.prefill(ids, mask)

        def fresh() -> StaticKVCache:
            cache = StaticKVCache(lean, kvs, mask, 1, a.prompt + a.tokens)
            for kc, vc in cache.kv:  # the full-width variants read unwritten columns (masked): no NaN garbage
                kc[..., a.prompt:] = 0
                vc[:, :, a.prompt:] = 0
            return cache

        first = torch.randint(3, vocab - 1, (a.rows,), generator=g)
        variants = {"eager (the engine, unfused)": lambda *args: lean.decode(*args),
                    "eager, full width": lambda *args: full_width_decode(lean, layer_step, *args),
                    "compiled layer": lambda *args: full_width_decode(lean, compiled, *args)}
        t0 = time.perf_counter()
        one_step = {name: f(first, torch.full((a.rows,), a.prompt), fresh(), a.prompt) for name, f in variants.items()}
        compile_s = time.perf_counter() - t0
        print(f"{what}, {a.dtype}, {a.rows} rows; {cpu_model()}")
        for name, f in variants.items():
            medians = []
            for _ in range(2):
                cache, tok, times = fresh(), first, []
                for i in range(a.tokens):
                    start = time.perf_counter()
                    tok = f(tok, torch.full((a.rows,), a.prompt + i), cache, a.prompt + i).argmax(-1)
                    times.append(time.perf_counter() - start)
                medians.append(statistics.median(times[4:]))
            diff = (one_step[name] - one_step["eager (the engine, unfused)"]).abs().max().item()
            print(f"  {name:<20} {1000 * min(medians):7.2f} ms/step   max |logit diff| {diff:.2e}")
        print(f"  first call of all three (compiling the layer included): {compile_s:.1f} s")


if __name__ == "__main__":
    main()
