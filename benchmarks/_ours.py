"""Our side of benchmarks/grpo_vs_trl.py and ppo_vs_trl.py: lightning_rlhf's GRPO or PPO for a few steps;
prints `RESULT {json}` with the step times and peak RSS. Run by the drivers, which pass the shared settings.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms import GRPO, PPO
from lightning_rlhf.data import collate_rows
from lightning_rlhf.rewards import REWARDS

from _worker import print_result, worker_parser


@REWARDS.register("digit_share")
def digit_share(prompts, completions, **_):
    """The benchmark's reward (both sides): the share of a completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


class StepTimes(Callback):
    """Each step's wall time, and its split as the stage logs it: perf/rollout_s (sampling, rewards, old and
    reference log-probs) and perf/update_s (forward, backward and optimizer steps)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.phases: dict[str, list[float]] = {"rollout_s": [], "update_s": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.t0)
        for name, values in self.phases.items():
            values.append(float(trainer.callback_metrics[f"perf/{name}"]))


def build(a: argparse.Namespace, bf16: bool) -> GRPO | PPO:
    """The stage under test with the benchmark's settings (forced lengths, beta > 0, AdamW lr 1e-6)."""
    rollout = {"num_generations": a.num_generations, "max_new_tokens": a.tokens, "min_new_tokens": a.tokens,
               "max_prompt_length": 256, "engine": a.engine, "dtype": "bfloat16" if bf16 else None}
    common = dict(policy=a.model, val_on_start=False, rollout=rollout, ref_dtype=a.ref_dtype,
                  release_ref_pages=a.release_ref_pages,
                  gradient_checkpointing=a.gradient_checkpointing,
                  optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True))
    if a.algo == "grpo":
        return GRPO(rewards={"digit_share": 1.0}, loss={"beta": a.beta},
                    optim={"epochs": 1, "micro_batch_size": a.micro_batch_size,
                           "logprob_micro_batch_size": a.logprob_micro_batch_size}, **common)
    scorer = {"name": "reward_model", "path": a.reward_model, "release_weights": bool(a.release_ref_pages)}
    return PPO(rewards=[scorer], loss={"beta": a.beta, "kl_kind": "k1"},
               optim={"epochs": a.ppo_epochs, "micro_batch_size": a.micro_batch_size,
                      "logprob_micro_batch_size": a.logprob_micro_batch_size}, critic={"init": "reward_model"},
               critic_optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True),
               **common)


def main() -> None:
    p = worker_parser()
    p.add_argument("--engine", default="static")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--logprob-micro-batch-size", type=int, default=None,
                   help="responses per no-grad forward (reference, old values; default: --micro-batch-size)")
    p.add_argument("--algo", choices=["grpo", "ppo"], default="grpo")
    p.add_argument("--ref-dtype", default=None, help="the reference model's weights dtype (default: the policy's)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--release-ref-pages", action="store_const", const=True, default=None,
                   help="drop the reference's weights after each use (PPO: the reward model's too); default: the "
                        "stage's own choice (on a CPU, for references of 64 MB or more)")
    p.add_argument("--keep-ref-pages", dest="release_ref_pages", action="store_const", const=False,
                   help="keep the reference's weights in memory")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = json.load(open(a.prompts))
    torch.manual_seed(0)
    bf16 = a.precision == "bf16"
    module = build(a, bf16)
    timer = StepTimes()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=a.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      precision="bf16-mixed" if bf16 else "32-true", callbacks=[timer])
    rows = [{"prompt": q, "answer": ""} for q in prompts]
    trainer.fit(module, DataLoader(rows, batch_size=a.prompts_per_step, collate_fn=collate_rows, shuffle=False))
    print_result("lightning_rlhf", timer.times, timer.phases)


if __name__ == "__main__":
    main()
