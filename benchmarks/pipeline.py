"""Run the CPU pipeline (tiny model -> SFT -> reward model -> GRPO -> PPO) and print what each stage reached.

    python benchmarks/pipeline.py [--stages sft rm grpo] [--extra "--trainer.max_steps 10"]
    python benchmarks/pipeline.py --stages grpo rloo reinforce_pp       # advantage estimators side by side
    python benchmarks/pipeline.py --stages smollm2_sft smollm2_grpo     # SmolLM2-135M on a CPU (about 40 min)

Each stage is the exact `python -m lightning_rlhf ...` command a user runs; this script only times it and
reads the stage's `summary.json` (validation metrics at step 0 and at the end) and, for RL stages, its
`metrics.csv` (mean train/reward of the first and last 10 logged steps, the largest train/kl). The printed
table is what benchmarks/RESULTS.md records.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

STAGES = {
    "tiny": (["make-tiny-model"], []),
    "sft": (["fit", "--config", "recipes/sft/tiny_arithmetic.yaml"], ["runs/sft_tiny_arithmetic"]),
    "rm": (["fit", "--config", "recipes/reward_model/tiny_arithmetic.yaml"], ["runs/rm_tiny_arithmetic"]),
    "grpo": (["fit", "--config", "recipes/r1_zero/tiny_arithmetic.yaml"], ["runs/r1_zero_tiny_arithmetic"]),
    "ppo": (["fit", "--config", "recipes/instructgpt/tiny_arithmetic.yaml"], ["runs/instructgpt_tiny_arithmetic"]),
    "dr_grpo": (["fit", "--config", "recipes/dr_grpo/tiny_arithmetic.yaml"], ["runs/dr_grpo_tiny_arithmetic"]),
    "dapo": (["fit", "--config", "recipes/dapo/tiny_arithmetic.yaml"], ["runs/dapo_tiny_arithmetic"]),
    "rloo": (["fit", "--config", "recipes/rloo/tiny_arithmetic.yaml"], ["runs/rloo_tiny_arithmetic"]),
    "reinforce_pp": (["fit", "--config", "recipes/reinforce_pp/tiny_arithmetic.yaml"],
                     ["runs/reinforce_pp_tiny_arithmetic"]),
    "quickstart": (["quickstart"], ["runs/quickstart", "runs/quickstart_grpo"]),
    "smollm2_sft": (["fit", "--config", "recipes/sft/smollm2_135m_cpu_cold_start.yaml"],
                    ["runs/sft_smollm2_135m_cold_start"]),
    "smollm2_grpo": (["fit", "--config", "recipes/r1_zero/smollm2_135m_arithmetic.yaml"],
                     ["runs/r1_zero_smollm2_135m_arithmetic"]),
}


def train_figures(root: Path, window: int = 10) -> str:
    """'val/accuracy by step ...; train/reward a -> b (first/last 10 steps), max train/kl c' from metrics.csv."""
    path = root / "metrics.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    curve = [f"{int(r['step']) + (r['step'] != '0')} {float(r['val/accuracy']):.3f}"
             for r in rows if r.get("val/accuracy")]  # Lightning logs validation at step N-1 (step 0 stays 0)
    curve_text = f"; val/accuracy by step: {', '.join(curve)}" if len(curve) > 2 else ""
    reward = [float(r["train/reward"]) for r in rows if r.get("train/reward")]
    kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    if not reward:
        return curve_text
    window = max(1, min(window, len(reward) // 2))  # short runs: halves, so the two means never overlap
    first, last = reward[:window], reward[-window:]
    return (f"{curve_text}; train/reward {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f} (mean of first/last "
            f"{window} logged steps); max train/kl {max(kl):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=["tiny", "sft", "rm", "grpo", "ppo"], choices=list(STAGES))
    p.add_argument("--extra", default="", help="extra CLI arguments for every fit stage")
    a = p.parse_args()
    rows = []
    for name in a.stages:
        args, roots = STAGES[name]
        cmd = [sys.executable, "-m", "lightning_rlhf", *args]
        if args[0] == "fit" and a.extra:
            cmd += shlex.split(a.extra)
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        for i, root in enumerate(roots or [None]):
            summary = json.loads((Path(root) / "summary.json").read_text()) if root else {}
            extra = train_figures(Path(root)) if root else ""
            label = name if len(roots) < 2 else f"{name}:{Path(root).name}"
            rows.append((label, wall if i == 0 else None, summary.get("val_before", {}), summary.get("val_after", {}),
                         extra))
    print(f"\n{'stage':<28}{'wall s':>8}  metric: before -> after")
    for name, wall, before, after, extra in rows:
        keys = [k for k in sorted(set(before) | set(after)) if k.startswith("val/")]
        metrics = "; ".join(f"{k} {before.get(k, float('nan')):.3f} -> {after.get(k, float('nan')):.3f}" for k in keys)
        print(f"{name:<28}{'' if wall is None else f'{wall:.1f}':>8}  {metrics}{extra}")


if __name__ == "__main__":
    main()
