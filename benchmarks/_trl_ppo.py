"""TRL's side of benchmarks/ppo_vs_trl.py: `trl.experimental.ppo.PPOTrainer` (TRL 1.12, in its own virtual
environment) for a few rollout steps; prints `RESULT {json}` with the step times and peak RSS.

Policy and reference from `--model`, value model and reward model from `--reward-model` (as InstructGPT and
our PPO recipe start the critic from the reward model); no stop token, so every response has exactly
`--tokens` tokens, like ours with min_new_tokens. A step is one rollout and its `num_ppo_epochs` updates.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer

from _worker import print_result, worker_parser


class StepTimes(TrainerCallback):
    """TRL's PPO loop calls on_step_end once per rollout step (and no on_step_begin): time between them."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def main() -> None:
    p = worker_parser()
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    a, _ = p.parse_known_args()
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = json.load(open(a.prompts))
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in prompts]
    ds = Dataset.from_dict({"input_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts]})
    f32 = {"dtype": torch.float32}
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.prompts_per_step, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=a.ppo_epochs, response_length=a.tokens, stop_token=None,
        total_episodes=a.steps * a.prompts_per_step, kl_coef=a.beta, learning_rate=1e-6, use_cpu=True,
        bf16=a.precision == "bf16", report_to=[], save_strategy="no", missing_eos_penalty=None,
        local_rollout_forward_batch_size=a.prompts_per_step, num_sample_generations=0, seed=0,
        **({"gradient_checkpointing": False} if a.no_gradient_checkpointing else {}),
    )
    timer = StepTimes()
    trainer = PPOTrainer(
        args=config, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(a.model, **f32),
        ref_model=AutoModelForCausalLM.from_pretrained(a.model, **f32),
        reward_model=AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1, **f32),
        value_model=AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1, **f32),
        train_dataset=ds, callbacks=[timer],
    )
    trainer.train()
    print_result("trl", timer.times)


if __name__ == "__main__":
    main()
