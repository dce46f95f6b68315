"""One side of benchmarks/grpo_vs_trl.py: lightning_rlhf's GRPO for a few steps; prints `RESULT {json}`.

Not meant to be run by hand: the driver passes the model, the prompts file and the shared settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms import GRPO
from lightning_rlhf.data import collate_rows
from lightning_rlhf.rewards import REWARDS


@REWARDS.register("digit_share")
def digit_share(prompts, completions, **_):
    """The benchmark's reward (both sides): the share of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--engine", default="static")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--micro-batch-size", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = json.load(open(a.prompts))
    torch.manual_seed(0)
    bf16 = a.precision == "bf16"
    module = GRPO(
        policy=a.model, rewards={"digit_share": 1.0}, val_on_start=False,
        rollout={"num_generations": a.num_generations, "max_new_tokens": a.tokens, "min_new_tokens": a.tokens,
                 "max_prompt_length": 256, "engine": a.engine},
        loss={"beta": a.beta}, optim={"epochs": 1, "micro_batch_size": a.micro_batch_size},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True),
    )
    timer = StepTimes()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=a.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      precision="bf16-mixed" if bf16 else "32-true", callbacks=[timer])
    rows = [{"prompt": q, "answer": ""} for q in prompts]
    trainer.fit(module, DataLoader(rows, batch_size=a.prompts_per_step, collate_fn=collate_rows, shuffle=False))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"side": "lightning_rlhf", "step_s": timer.times, "peak_rss_mb": rss}), flush=True)


if __name__ == "__main__":
    main()
