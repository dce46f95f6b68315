"""What the benchmark workers (_ours.py, _trl_grpo.py, _trl_ppo.py) share: their common command-line settings
and the `RESULT {json}` line the drivers read. Standard library only, so it also runs in TRL's own venvs.
"""

from __future__ import annotations

import argparse
import json
import resource


def worker_parser() -> argparse.ArgumentParser:
    """The settings every side takes, so both sides of a comparison read the same flags the same way."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reward-model", default=None, help="PPO: reward model dir (the critic starts from it)")
    p.add_argument("--ppo-epochs", type=int, default=2)
    return p


def print_result(side: str, step_times: list[float], phases: dict[str, list[float]] | None = None) -> None:
    """One line for the driver: this side's step times, per-step phase times if known, and the process's peak
    RSS in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"side": side, "step_s": step_times, "peak_rss_mb": rss, "phases": phases or {}}
    print("RESULT " + json.dumps(result), flush=True)
