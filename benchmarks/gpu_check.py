"""GPU check of the strategies: GRPO and PPO for a few steps under each strategy block of `configs/strategy/`,
against a single-device run with the same global batch. Prints, per run, each step's train/loss and the
largest difference from the single-device run, and writes the table to `--out` (JSON).

    python benchmarks/gpu_check.py                                   # on a GPU machine: everything below
    python benchmarks/gpu_check.py --models tiny --stages grpo --strategies single ddp_cpu --accelerator cpu

Models: `tiny` (the tiny Llama of `make-tiny-model`) and `smollm2_shape` (random weights in the shape of
SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536; the vocabulary is the local tokenizer's,
since no hub is reachable). Every run samples with a key (`rollout.sampling_seed`), so every strategy draws
the same responses as long as the weights agree; runs use plain SGD in fp32 unless the strategy block sets a
precision (FSDP and DeepSpeed blocks set bf16-mixed, so their differences are at bf16 level, not 1e-5).
Strategies whose library is missing (deepspeed) or that need more devices than there are, are reported as
skipped. Each run is `tests/helpers/fit_with_test_rewards.py fit` in a subprocess, as in tests/test_ddp.py.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_ddp import SCRIPT, config  # noqa: E402  (the same run settings as the CI equality test)

SMOLLM2_SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                     max_position_embeddings=2048)


def build_models(root: Path, names: list[str]) -> dict[str, Path]:
    from lightning_rlhf.models import build_tiny_model

    shapes = {"tiny": dict(hidden_size=128, num_layers=4, num_heads=4), "smollm2_shape": SMOLLM2_SHAPE}
    return {n: Path(build_tiny_model(root / n, vocab_size=512, **shapes[n])) for n in names}


def skip_reason(strategy: str, devices: int) -> str | None:
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if strategy in ("ddp", "ddp_cpu") and devices < 2:
        return "needs 2 devices"
    return None


def run_config(stage: str, model: Path, out: Path, strategy: str, accelerator: str, devices: int) -> dict:
    cfg = config(stage, model, out, devices=1)  # settings shared with tests/test_ddp.py
    trainer = cfg["trainer"]
    trainer["accelerator"] = accelerator
    if strategy != "single":
        block = yaml.safe_load((REPO / "configs" / "strategy" / f"{strategy}.yaml").read_text())["trainer"]
        trainer.update({k: v for k, v in block.items() if k not in ("accelerator",)})
        trainer["devices"] = devices
        per_rank = 8 // devices
        cfg["data"]["init_args"]["batch_size"] = per_rank
    return cfg


def run(cfg: dict, out: Path) -> tuple[list[float], float]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), "fit", "--config", str(out / "run.yaml")], cwd=REPO,
                          capture_output=True, text=True)
    (out / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    with open(out / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return losses, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2_shape"])
    p.add_argument("--stages", nargs="+", default=["grpo", "ppo"])
    p.add_argument("--strategies", nargs="+", default=["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--devices", type=int, default=None, help="devices per multi-device run (default: all GPUs)")
    p.add_argument("--work", default="runs/gpu_check")
    p.add_argument("--out", default="runs/gpu_check/results.json")
    a = p.parse_args()
    import torch

    devices = a.devices or (torch.cuda.device_count() if a.accelerator == "gpu" else 2)
    work = Path(a.work)
    models, rows = build_models(work / "models", a.models), []
    for model_name, model in models.items():
        for stage in a.stages:
            base: list[float] | None = None
            for strategy in a.strategies:
                row = {"model": model_name, "stage": stage, "strategy": strategy, "devices": devices}
                reason = skip_reason(strategy, devices)
                if reason:
                    rows.append({**row, "status": f"skipped: {reason}"})
                    continue
                out = work / model_name / stage / strategy
                try:
                    losses, wall = run(run_config(stage, model, out, strategy, a.accelerator, devices), out)
                except RuntimeError as e:
                    rows.append({**row, "status": f"failed: {e}"})
                    continue
                base = losses if strategy == "single" else base
                diff = None if base is None else max(abs(x - y) for x, y in zip(losses, base))
                rows.append({**row, "status": "ok", "losses": losses, "max_loss_diff": diff, "wall_s": round(wall, 1)})
                print(json.dumps(rows[-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"{'model':14} {'stage':5} {'strategy':16} status / max |loss - single|")
    for r in rows:
        diff = r.get("max_loss_diff")
        print(f"{r['model']:14} {r['stage']:5} {r['strategy']:16} {r['status']}" + ("" if diff is None else f" {diff:.2e}"))


if __name__ == "__main__":
    main()
