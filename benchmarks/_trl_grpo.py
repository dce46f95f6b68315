"""One side of benchmarks/grpo_vs_trl.py: TRL's GRPOTrainer for a few steps; prints `RESULT {json}`.

Runs in TRL's own virtual environment (see the driver's docstring); not meant to be run by hand.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from _worker import print_result, worker_parser


def digit_share(prompts, completions, **_):
    """The benchmark's reward (both sides): the share of a completion's characters that are digits."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.t0)


def main() -> None:
    p = worker_parser()
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = json.load(open(a.prompts))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in prompts])
    bf16 = a.precision == "bf16"
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts_per_step * a.num_generations,
        gradient_accumulation_steps=1, num_generations=a.num_generations, max_completion_length=a.tokens,
        generation_kwargs={"min_new_tokens": a.tokens}, beta=a.beta, num_iterations=1, max_steps=a.steps,
        learning_rate=1e-6, weight_decay=0.0, logging_steps=1, report_to=[], use_cpu=True, bf16=bf16,
        save_strategy="no", shuffle_dataset=False, temperature=1.0, seed=0,
        model_init_kwargs={"dtype": torch.float32},
        **({"gradient_checkpointing": False} if a.no_gradient_checkpointing else {}),
    )
    timer = StepTimes()
    trainer = GRPOTrainer(model=a.model, reward_funcs=digit_share, args=config, train_dataset=ds, callbacks=[timer])
    trainer.train()
    print_result("trl", timer.times)


if __name__ == "__main__":
    main()
