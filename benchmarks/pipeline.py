"""Run the CPU pipeline (tiny model -> SFT -> reward model -> GRPO) and print what each stage reached.

    python benchmarks/pipeline.py [--stages sft rm grpo] [--extra "--trainer.max_steps 10"]

Each stage is the exact `python -m lightning_rlhf ...` command a user runs; this script only times it and
reads the stage's `summary.json` (validation metrics at step 0 and at the end). The printed table is what
benchmarks/RESULTS.md records.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

STAGES = {
    "tiny": (["make-tiny-model"], None),
    "sft": (["fit", "--config", "recipes/sft/tiny_arithmetic.yaml"], "runs/sft_tiny_arithmetic"),
    "rm": (["fit", "--config", "recipes/reward_model/tiny_arithmetic.yaml"], "runs/rm_tiny_arithmetic"),
    "grpo": (["fit", "--config", "recipes/r1_zero/tiny_arithmetic.yaml"], "runs/r1_zero_tiny_arithmetic"),
    "ppo": (["fit", "--config", "recipes/instructgpt/tiny_arithmetic.yaml"], "runs/instructgpt_tiny_arithmetic"),
    "quickstart": (["quickstart"], "runs/quickstart"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=["tiny", "sft", "rm", "grpo"], choices=list(STAGES))
    p.add_argument("--extra", default="", help="extra CLI arguments for every fit stage")
    a = p.parse_args()
    rows = []
    for name in a.stages:
        args, root = STAGES[name]
        cmd = [sys.executable, "-m", "lightning_rlhf", *args]
        if args[0] == "fit" and a.extra:
            cmd += shlex.split(a.extra)
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        summary = json.loads((Path(root) / "summary.json").read_text()) if root else {}
        rows.append((name, wall, summary.get("val_before", {}), summary.get("val_after", {})))
    print(f"\n{'stage':<11}{'wall s':>8}  metric: before -> after")
    for name, wall, before, after in rows:
        keys = [k for k in sorted(set(before) | set(after)) if k.startswith("val/")]
        metrics = "; ".join(f"{k} {before.get(k, float('nan')):.3f} -> {after.get(k, float('nan')):.3f}" for k in keys)
        print(f"{name:<11}{wall:>8.1f}  {metrics}")


if __name__ == "__main__":
    main()
