"""Data parallel equals one process: a 2-rank DDP run (gloo, CPU) of GRPO and of PPO logs the same metrics and
ends with the same weights as a 1-process run over the same global batch.

What makes them equal: keyed sampling (`rollout.sampling_seed`: a prompt draws the same responses on any rank
and in any batch), token-mean normalised by the tokens of every rank (`micro_batches`' `token_norm`), cross-rank
whitening and KL control, and train metrics reduced over ranks. SGD without clipping makes the final weights
proportional to the summed gradients (Adam's first steps would hide a gradient scaled by a constant). Each run
is a real `fit` in a subprocess; the DDP one launches its second rank the way Lightning does on a cluster.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.compare import assert_runs_close

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "helpers" / "fit_with_test_rewards.py"
STEPS = 3


def config(stage: str, model_dir: Path, out: Path, devices: int) -> dict:
    """A 3-step run over 8 prompts per step (global), sampled with a key, plain SGD, no clipping."""
    common = {
        "policy": str(model_dir), "output_dir": str(out / "model"), "rewards": {"digit_share": 1.0},
        "val_on_start": False,
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
    }
    if stage == "grpo":
        model = {"class_path": "lightning_rlhf.algorithms.GRPO", "init_args": {
            **common, "rollout": {"num_generations": 4, "max_new_tokens": 8, "sampling_seed": 0},
            "loss": {"beta": 0.1}, "optim": {"max_grad_norm": None, "epochs": 2}}}
    else:
        model = {"class_path": "lightning_rlhf.algorithms.PPO", "init_args": {
            **common, "rollout": {"num_generations": 1, "max_new_tokens": 8, "sampling_seed": 0},
            "loss": {"beta": 0.05}, "adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 100,
            "optim": {"max_grad_norm": None, "epochs": 2},
            "critic": {"max_grad_norm": None, "output_dir": str(out / "critic")},
            "critic_optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 2.0e-4}}}}
    trainer = {"accelerator": "cpu", "devices": devices, "max_steps": STEPS, "log_every_n_steps": 1,
               "num_sanity_val_steps": 0, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, "default_root_dir": str(out)}
    if devices > 1:
        trainer["strategy"] = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                               "init_args": {"process_group_backend": "gloo", "find_unused_parameters": True}}
    data = {"class_path": "lightning_rlhf.data.PromptDataModule", "init_args": {
        "train": {"task": "arithmetic", "n": 16, "split": "train", "seed": 0}, "batch_size": 8 // devices,
        "shuffle": True, "seed": 3}}  # 2 steps per epoch: the 3rd step reads the 2nd epoch's order
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def run(cli, stage: str, model_dir: Path, out: Path, devices: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    out.mkdir(parents=True)
    (out / "run.yaml").write_text(yaml.safe_dump(config(stage, model_dir, out, devices)))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "LIGHTNING_RLHF_ONEDNN": "0"}  # the same float32 linear in both runs, not one timed per process
    done = cli.run([str(SCRIPT), "fit", "--config", str(out / "run.yaml")], cwd=ROOT, env=env)  # tests/conftest.py
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward")]
    weights = load_file(out / "model" / "model.safetensors")
    if (out / "critic").exists():
        weights.update({f"critic.{k}": v for k, v in load_file(out / "critic" / "model.safetensors").items()})
    return rows, weights


def assert_same_run(one: tuple, two: tuple) -> list[dict]:
    """Every train/ metric of every step within 1e-5 (relative above 1), every weight within 1e-5."""
    (rows1, w1), (rows2, w2) = one, two
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] and len(rows1) == STEPS
    assert_runs_close(rows1, rows2, w1, w2, keep=lambda k: k.startswith("train/"), tol=1e-5)
    return rows1


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_two_ranks_equal_one_process(stage, tiny_model_dir, tmp_path, cli):
    one = run(cli, stage, tiny_model_dir, tmp_path / "one", devices=1)
    two = run(cli, stage, tiny_model_dir, tmp_path / "two", devices=2)
    rows = assert_same_run(one, two)
    # the runs learnt something: rewards varied (non-zero advantages) and the weights moved from the start
    assert max(float(r["train/reward_std"]) for r in rows) > 0
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert max(float((one[1][k] - start[k]).abs().max()) for k in start if k in one[1]) > 1e-4
    if stage == "ppo":  # the adaptive KL controller moved beta the same way on both
        assert float(rows[-1]["train/kl_coef"]) != 0.05
