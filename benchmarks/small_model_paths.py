"""A small float32 model's CPU paths, each against the path it replaces, alternating in one process:

    python benchmarks/small_model_paths.py --model checkpoints/tiny-base [--prompt-tokens 43] [--repeats 5]

- reference pass: the no-grad teacher-forced log-probs of 8 prompts x 4 samples x 32 tokens through the one-call
  step kernel (`rollout/lean_scoring.py`: a prefill of the distinct prompts, then every row's response in one
  call) against the HF modules (`teacher_forcing`'s shared-prompt forward);
- prefill: the 8 prompts through the one-call step (`LeanLlama.prefill`) against the per-operation prefill;
- training forward and backward of the same rows with the fused RMSNorm and SiLU kernels (`rollout/train_ops.py`)
  against the HF modules;
- token log-probs and entropy, forward and backward, of the 32 x 32 response logits at the model's vocabulary and
  at SmolLM2's (49152), through the fused kernel (`train_ops.token_logprobs`) against the chunked torch version
  (`functional.logprobs_and_entropy`).

Each line prints the medians (ms) over `--repeats` alternating rounds of 10 calls and the ratio replaced / ours,
with the machine's CPU model. Record results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lightning_rlhf.algorithms.runtime import cpu_model  # noqa: E402
from lightning_rlhf.models import load_causal_lm  # noqa: E402
from lightning_rlhf.functional import logprobs_and_entropy  # noqa: E402
from lightning_rlhf.rollout import Rollout, decode_step, lean_scoring, train_ops, use_fused_training_ops  # noqa: E402
from lightning_rlhf.rollout.lean_llama import LeanLlama  # noqa: E402
from lightning_rlhf.rollout.teacher_forcing import _plain_or_shared_logits  # noqa: E402


def timed(fn, calls: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/tiny-base")
    p.add_argument("--prompt-tokens", type=int, default=43)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = load_causal_lm(a.model).eval()
    prompts, g, t, vocab = 8, 4, 32, model.config.vocab_size
    ids = torch.randint(3, vocab, (prompts, a.prompt_tokens))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ro = Rollout(prompt_ids=ids.repeat_interleave(g, 0), prompt_mask=mask.repeat_interleave(g, 0),
                 response_ids=torch.randint(3, vocab, (prompts * g, t)), response_mask=torch.ones(prompts * g, t),
                 logprobs=torch.zeros(prompts * g, t), truncated=torch.zeros(prompts * g, dtype=torch.bool),
                 group_size=g)
    lean, limit = LeanLlama.from_model(model), decode_step.SMALL_STEP_BYTES
    decode_step.SMALL_STEP_BYTES = 0
    ops = LeanLlama.from_model(model)  # the per-operation prefill (no one-call step)
    decode_step.SMALL_STEP_BYTES = limit
    fused, plain = use_fused_training_ops(copy.deepcopy(model).train()), copy.deepcopy(model).train()
    inputs = ro.input_ids

    def train(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        m(inputs, attention_mask=ro.attention_mask, logits_to_keep=t + 1).logits.logsumexp(-1).sum().backward()

    def token_logprobs(fn, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        logits.grad = None
        fn(logits, tokens, 1.0, True)[0].sum().backward()

    small = torch.randn(prompts * g, t, vocab, requires_grad=True)
    big = torch.randn(prompts * g, t, 49152, requires_grad=True)
    tokens_small, tokens_big = ro.response_ids % vocab, ro.response_ids % 49152
    pairs = {
        "reference pass": (lambda: lean_scoring.response_logits(model, ro), lambda: _plain_or_shared_logits(model, ro)),
        "prefill": (lambda: lean.prefill(ids, mask), lambda: ops.prefill(ids, mask)),
        "train fwd+bwd": (lambda: train(fused), lambda: train(plain)),
        f"logprobs V={vocab}": (lambda: token_logprobs(train_ops.token_logprobs, small, tokens_small),
                                lambda: token_logprobs(logprobs_and_entropy, small, tokens_small)),
        "logprobs V=49152": (lambda: token_logprobs(train_ops.token_logprobs, big, tokens_big),
                             lambda: token_logprobs(logprobs_and_entropy, big, tokens_big)),
    }
    print(f"machine: {cpu_model()}; model {a.model}; {prompts} prompts x {g} samples, prompt {a.prompt_tokens} "
          f"tokens, response {t}")
    for name, (ours, replaced) in pairs.items():
        times: dict[str, list[float]] = {"ours": [], "replaced": []}
        with torch.set_grad_enabled(not name.startswith(("reference", "prefill"))):
            ours(), replaced()  # warm-up (and the one-time weight copy of the reference pass)
            for _ in range(a.repeats):
                times["ours"].append(timed(ours))
                times["replaced"].append(timed(replaced))
        o, m = statistics.median(times["ours"]), statistics.median(times["replaced"])
        print(f"{name:17s} ours {o:7.2f} ms  replaced {m:7.2f} ms  replaced / ours {m / o:.2f}x")


if __name__ == "__main__":
    main()
