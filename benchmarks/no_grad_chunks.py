"""How a no-grad teacher-forced pass (the reference's log-probs) costs with the rows per forward: one rollout of 8
prompts x 4 samples, scored in chunks of each size in turn, the sizes alternating within each repeat.

    python benchmarks/no_grad_chunks.py [--model checkpoints/smollm2-135m-instruct] [--tokens 32]
                                        [--sizes 4,8,16,32] [--repeats 3]

Prints, per chunk size, the tokens per forward and the best and median time of the whole pass. This is what
sized `optim.logprob_micro_batch_size`'s default (`algorithms/plan.py: no_grad_rows`). Results:
benchmarks/RESULTS.md ("The same AVX2-only EPYC, a second day").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.grpo_vs_trl import INSTRUCTION  # noqa: E402
from lightning_rlhf.algorithms.runtime import cpu_model, keep_freed_memory  # noqa: E402
from lightning_rlhf.data.tasks import arithmetic_problems  # noqa: E402
from lightning_rlhf.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from lightning_rlhf.rollout import ROLLOUT_ENGINES, sequence_logprobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sizes", default="4,8,16,32")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    keep_freed_memory()
    model, tok = load_causal_lm(a.model).eval(), load_tokenizer(a.model)
    prompts = [r["prompt"] + INSTRUCTION for r in arithmetic_problems(8, seed=5)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ro = ROLLOUT_ENGINES.get("static")().generate(
        model, enc.input_ids, enc.attention_mask, num_generations=4, max_new_tokens=a.tokens,
        min_new_tokens=a.tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    width = ro.input_ids.shape[1]
    sizes = [int(s) for s in a.sizes.split(",")]
    times: dict[int, list[float]] = {s: [] for s in sizes}
    with torch.no_grad():
        for _ in range(a.repeats):
            for s in sizes:
                start = time.perf_counter()
                for idx in torch.arange(len(ro)).split(s):
                    sequence_logprobs(model, ro.select(idx))
                times[s].append(time.perf_counter() - start)
    print(f"machine: {cpu_model()}; model {a.model}; {len(ro)} responses of {width} tokens (prompt + response)")
    for s in sizes:
        print(f"rows per forward {s:3d} ({s * width:5d} tokens): best {min(times[s]) * 1000:8.1f} ms, "
              f"median {statistics.median(times[s]) * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
