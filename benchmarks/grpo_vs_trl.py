"""GRPO step time and peak memory: lightning_rlhf against TRL's GRPOTrainer, side by side in one run.

    python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 "trl==1.16.*"    # TRL's own env
    python benchmarks/grpo_vs_trl.py --model checkpoints/smollm2-135m-instruct --precision fp32 --repeats 2

The same model, prompts (generated arithmetic with a think/answer instruction), group size, forced completion
length (min = max new tokens), beta > 0 (so both load a reference model), one optimizer step per rollout
(mu = 1), AdamW at lr 1e-6 and a digit-count reward, in one process each. The two alternate (ours, TRL, ours,
TRL, ...) so that a busy machine slows both alike. Step times are measured from step start to step end (rollout,
reward, reference, update); the first `--warmup` steps of each run are dropped and the median of the rest over
all repeats is reported, with the ratio TRL / ours and each side's peak RSS (`ru_maxrss`).

TRL runs with its own defaults (gradient checkpointing on, fused AdamW) except the precision: `--precision fp32`
sets bf16=False; `--trl-gradient-checkpointing off` measures it without. Ours runs with the recipe defaults
(the "static" rollout engine, prompts shared across each group's forward) plus `--micro-batch-size` if given.
In bf16, ours trains under bf16-mixed and samples in bfloat16 (old log-probs recomputed), TRL with bf16=True.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from lightning_rlhf.algorithms.runtime import cpu_model  # noqa: E402
from lightning_rlhf.data.tasks import arithmetic_problems  # noqa: E402

INSTRUCTION = " Think inside <think></think>, then answer inside <answer></answer>."


def reward_model_next_to(policy: str) -> str:
    """A reward model with a fresh scalar head on the policy's body, written once beside it (PPO's RM and critic)."""
    from lightning_rlhf.models import load_reward_model, load_tokenizer, save_hf

    out = Path(policy.rstrip("/") + "-rm")
    if not (out / "config.json").exists():
        import torch

        torch.manual_seed(0)
        save_hf(load_reward_model(policy), load_tokenizer(policy), out)
    return str(out)


def run(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(algo: str = "grpo", trl_python: str = ".venv-trl/bin/python", doc: str = __doc__) -> None:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF directory (e.g. checkpoints/tiny-base)")
    p.add_argument("--trl-python", default=trl_python)
    p.add_argument("--reward-model", default=None, help="PPO: reward model dir (default: written next to --model)")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4 if algo == "grpo" else 1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--micro-batch-size", type=int, default=None, help="ours: responses per forward/backward")
    p.add_argument("--ours-extra", default="", help="more flags for our side: --ref-dtype bfloat16, "
                   "--gradient-checkpointing, --engine hf, --release-ref-pages, --keep-ref-pages")
    p.add_argument("--trl-gradient-checkpointing", choices=["default", "off"], default="default")
    a = p.parse_args()
    prompts = [r["prompt"] + INSTRUCTION for r in arithmetic_problems(a.steps * a.prompts_per_step, seed=5)]
    prompt_file = Path(tempfile.mkdtemp()) / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    shared = ["--model", a.model, "--prompts", str(prompt_file), "--steps", str(a.steps), "--precision", a.precision,
              "--prompts-per-step", str(a.prompts_per_step), "--num-generations", str(a.num_generations),
              "--tokens", str(a.tokens), "--beta", str(a.beta)]
    if algo == "ppo":
        shared += ["--reward-model", a.reward_model or reward_model_next_to(a.model), "--ppo-epochs", str(a.ppo_epochs)]
    ours_cmd = [sys.executable, str(HERE / "_ours.py"), "--algo", algo, *shared]
    if a.micro_batch_size:
        ours_cmd += ["--micro-batch-size", str(a.micro_batch_size)]
    ours_cmd += shlex.split(a.ours_extra)
    trl_cmd = [a.trl_python, str(HERE / f"_trl_{algo}.py"), *shared]
    if a.trl_gradient_checkpointing == "off":
        trl_cmd += ["--no-gradient-checkpointing"]
    results: dict[str, list[dict]] = {"lightning_rlhf": [], "trl": []}
    for i in range(a.repeats):
        for side, cmd in (("lightning_rlhf", ours_cmd), ("trl", trl_cmd)):
            results[side].append(run(cmd))
            print(f"repeat {i + 1} {side}: " + ", ".join(f"{t:.2f}" for t in results[side][-1]["step_s"]) + " s/step",
                  flush=True)
    summary = {}
    for side, runs in results.items():
        steps = [t for r in runs for t in r["step_s"][a.warmup:]]
        summary[side] = {"median_step_s": statistics.median(steps), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
        phases = {k: statistics.median([t for r in runs for t in r["phases"][k][a.warmup:]])
                  for k in runs[0]["phases"]}
        summary[side]["phases"] = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in phases.items())
    ours, trl = summary["lightning_rlhf"], summary["trl"]
    updates = "mu 1" if algo == "grpo" else f"{a.ppo_epochs} PPO epochs, one mini-batch"
    print(f"\n{algo}; machine: {cpu_model()}; model {a.model}; {a.precision}; {a.prompts_per_step} prompts x "
          f"{a.num_generations} samples x {a.tokens} tokens, beta {a.beta}, {updates}; ours: micro-batch "
          f"{a.micro_batch_size or 'all'} {a.ours_extra}".rstrip())
    print(f"{'side':<16}{'median s/step':>14}{'peak RSS MB':>13}  median split")
    for side, s in summary.items():
        print(f"{side:<16}{s['median_step_s']:>14.2f}{s['peak_rss_mb']:>13.0f}  {s['phases']}")
    print(f"TRL / ours step time: {trl['median_step_s'] / ours['median_step_s']:.2f}x; "
          f"ours / TRL peak RSS: {ours['peak_rss_mb'] / trl['peak_rss_mb']:.0%}")


if __name__ == "__main__":
    main()
