"""Rollout throughput: the "static" engine against HF `generate` (the "hf" engine), side by side in one run.

    python benchmarks/rollout.py [--model checkpoints/smollm2-135m-instruct] [--tokens 64] [--repeats 2]

For each model (the tiny Llama of the CPU recipes, and SmolLM2-135M: the HF directory that
`python -m lightning_rlhf gguf-to-hf .../SmolLM2-135M-Instruct.Q4_1.gguf --out checkpoints/smollm2-135m-instruct`
writes, or a random-init model of the same shape when it is missing: speed does not depend on the weights),
batch (8 and 64 rows: 1 and 8 prompts x 8 samples) and precision (float32, and bfloat16 when it is faster here),
it samples `--tokens` tokens per row (min = max new tokens, so both engines do the same work) and prints
tokens/s, the ratio, and the achieved model FLOP/s as a share of this machine's measured matmul peak in that
precision (`python -m lightning_rlhf doctor`), the highest of the readings taken at the start and after each
static timing (CPU speed drifts; the highest reading gives the lowest share). Model FLOPs are 2 x (parameters
without the input embedding) per token, prompt and generated; attention is left out. The median of `--repeats`
runs is reported. `--unfused` also times the static engine without its fused CPU kernels; `--batches 64` and
`--tiny ""` narrow the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_rlhf.algorithms.runtime import cpu_model, keep_freed_memory, matmul_gflops  # noqa: E402
from lightning_rlhf.rollout import ROLLOUT_ENGINES  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)


def load(path: str, shape: dict | None) -> tuple[str, torch.nn.Module]:
    if Path(path).is_dir():
        return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    return f"random init of {path}'s shape", LlamaForCausalLM(LlamaConfig(**shape)).eval()


def model_flops_per_token(model: torch.nn.Module) -> float:
    n = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return 2.0 * n


def time_engine(engine, model, ids, mask, tokens: int, g: int, repeats: int) -> float:
    kw = dict(num_generations=g, max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=2, pad_token_id=0,
              temperature=1.0)
    engine.generate(model, ids[:1], mask[:1], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(model, ids, mask, **kw)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", default="checkpoints/tiny-base", help="the small model ('' to skip it)")
    p.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--unfused", action="store_true", help="also time the static engine without its fused CPU "
                   "kernels (rollout.engine_kwargs.cpu_kernels: false)")
    a = p.parse_args()
    keep_freed_memory()
    peaks = {name: matmul_gflops(getattr(torch, name)) for name in ("float32", "bfloat16")}
    dtypes = ["float32"] + (["bfloat16"] if peaks["bfloat16"] > 1.3 * peaks["float32"] else [])
    print(f"machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    rows = []
    tiny_shape = dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    for path, shape in ((a.tiny, tiny_shape), (a.model, SMOLLM2)):
        if not path:
            continue
        name, model = load(path, shape)
        flops = model_flops_per_token(model)
        for batch in a.batches:
            torch.manual_seed(1)
            ids = torch.randint(3, model.config.vocab_size, (batch // 8, a.prompt_tokens))
            mask = torch.ones_like(ids)
            for dtype in dtypes:
                hf = time_engine(ROLLOUT_ENGINES.get("hf")(dtype=dtype), model, ids, mask, a.tokens, 8, a.repeats)
                fast = time_engine(ROLLOUT_ENGINES.get("static")(dtype=dtype), model, ids, mask, a.tokens, 8, a.repeats)
                unfused = fast
                if a.unfused:
                    unfused = time_engine(ROLLOUT_ENGINES.get("static")(dtype=dtype, cpu_kernels=False), model, ids,
                                          mask, a.tokens, 8, a.repeats)
                peaks[dtype] = max(peaks[dtype], matmul_gflops(getattr(torch, dtype)))  # this machine drifts
                total = flops * (ids.numel() + batch * a.tokens)
                rows.append({"model": name, "batch": batch, "dtype": dtype, "hf_tok_s": batch * a.tokens / hf,
                             "static_tok_s": batch * a.tokens / fast, "ratio": hf / fast,
                             "unfused_tok_s": batch * a.tokens / unfused,
                             "static_peak_share": total / fast / 1e9 / peaks[dtype],
                             "hf_peak_share": total / hf / 1e9 / peaks[dtype]})
                r = rows[-1]
                print(f"{name:<40} batch {batch:>3} {dtype:<9} hf {r['hf_tok_s']:8.0f} tok/s  static "
                      f"{r['static_tok_s']:8.0f} tok/s  x{r['ratio']:.2f} (unfused {r['unfused_tok_s']:.0f})  "
                      f"share of matmul peak "
                      f"({peaks[dtype]:.0f} GFLOP/s): static {r['static_peak_share']:.0%}, hf {r['hf_peak_share']:.0%}",
                      flush=True)
    print("RESULTS " + json.dumps(rows))


if __name__ == "__main__":
    main()
