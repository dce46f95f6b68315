"""The non-finite guard: a NaN/inf loss or gradient skips that update, is counted and named; K in a row stop."""

from __future__ import annotations

import csv
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_rlhf.algorithms.guard import NonFiniteGuard, TrainingDiverged, first_nonfinite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "helpers" / "fit_with_test_rewards.py"


def test_first_nonfinite_names_the_loss_then_the_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert first_nonfinite({"policy loss": torch.tensor(0.5)}, {"policy": model}) is None  # no gradients yet
    model(torch.ones(1, 2)).sum().backward()
    assert first_nonfinite({"policy loss": torch.tensor(0.5)}, {"policy": model}) is None
    model[1].weight.grad[0, 1] = float("inf")
    assert first_nonfinite({"policy loss": 0.5}, {"policy": model}) == "policy gradient of 1.weight"
    assert first_nonfinite({"policy loss": float("nan")}, {"policy": model}) == "policy loss"


def test_huge_but_finite_gradients_are_not_skipped():
    # the fused norm of [1e30, 1e30] overflows float32 (sqrt(2e60) > 3.4e38), but every value is finite
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.full((1, 2), 1e30)
    assert first_nonfinite({}, {"policy": model}) is None


def test_guard_counts_resets_and_stops_after_k_in_a_row():
    guard, model = NonFiniteGuard(max_in_a_row=2), torch.nn.Linear(1, 1)
    with pytest.warns(RuntimeWarning, match="step 3: non-finite policy loss; update skipped"):
        assert guard.should_skip({"policy loss": float("nan")}, {"policy": model}, step=3)
    assert not guard.should_skip({"policy loss": 1.0}, {"policy": model}, step=4)  # resets the run of bad ones
    with pytest.warns(RuntimeWarning):
        assert guard.should_skip({"policy loss": float("inf")}, {}, step=5)
    assert (guard.skipped, guard.in_a_row) == (2, 1)
    with pytest.raises(TrainingDiverged, match="2 updates in a row .* step 6: policy loss"):
        guard.should_skip({"policy loss": float("nan")}, {}, step=6)
    # a bad value seen on another rank makes this rank skip too
    guard = NonFiniteGuard(3)
    with pytest.warns(RuntimeWarning, match="another rank"):
        assert guard.should_skip({"policy loss": 1.0}, {}, step=1, any_rank=lambda flag: True)


def fit(cli, model_dir: Path, out: Path, nan_calls: str, max_steps: int, limit: int = 3) -> subprocess.CompletedProcess:
    """GRPO with one micro-batch per rollout step, so loss call k is step k's update."""
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "max_steps": max_steps, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                       "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(out),
                       "callbacks": [{"class_path": "lightning_rlhf.callbacks.RunCheckpoint",
                                      "init_args": {"every_n_steps": 1, "keep_last": 2}}]},
           "model": {"class_path": "lightning_rlhf.algorithms.GRPO", "init_args": {
               "policy": str(model_dir), "output_dir": str(out / "model"), "rewards": {"distinct_share": 1.0},
               "val_on_start": False, "max_skipped_in_a_row": limit, "loss": {"name": "grpo_nan_on_call", "beta": 0.1},
               "rollout": {"num_generations": 4, "max_new_tokens": 8},
               "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}},
           "data": {"class_path": "lightning_rlhf.data.PromptDataModule", "init_args": {
               "train": {"task": "arithmetic", "n": 16, "split": "train", "seed": 0}, "batch_size": 2}}}
    out.mkdir(parents=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RLHF_TEST_NAN_CALLS": nan_calls}
    return cli.run([str(SCRIPT), "fit", "--config", str(out / "run.yaml")], cwd=ROOT, env=env)  # tests/conftest.py


@pytest.mark.slow
def test_a_nan_update_is_skipped_and_the_run_goes_on(tiny_model_dir, tmp_path, cli):
    done = fit(cli, tiny_model_dir, tmp_path / "run", nan_calls="2", max_steps=3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2: non-finite policy loss; update skipped (1 in a row, 1 in this run)" in done.stderr
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/skipped_updates")]
    assert [float(r["train/skipped_updates"]) for r in rows] == [0.0, 1.0, 1.0]
    assert math.isnan(float(rows[1]["train/loss"])) and not math.isnan(float(rows[2]["train/loss"]))
    weights, start = load_file(tmp_path / "run" / "model" / "model.safetensors"), load_file(
        Path(tiny_model_dir) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max(float((weights[k] - start[k]).abs().max()) for k in start) > 1e-5  # steps 1 and 3 trained


@pytest.mark.slow
def test_k_bad_updates_in_a_row_stop_the_run_and_keep_its_checkpoints(tiny_model_dir, tmp_path, cli):
    done = fit(cli, tiny_model_dir, tmp_path / "run", nan_calls="from:3", max_steps=6, limit=2)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 updates in a row had a non-finite value (the last at step 4: policy loss)")
    assert "Traceback" not in done.stderr
    # steps 1, 2 trained, step 3 skipped (its weights are step 2's), step 4 stopped the run before its save
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == ["step=2.ckpt", "step=3.ckpt"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step=3.ckpt", weights_only=True)
    assert ckpt["lightning_rlhf"]["stage"]["guard"] == {"skipped": 1, "in_a_row": 1}


def test_sft_skips_a_nan_update_under_automatic_optimization(tiny_model_dir, tmp_path):
    from lightning.pytorch import Trainer

    from lightning_rlhf.algorithms import SFT
    from lightning_rlhf.data import SFTDataModule

    class NaNOnSecondStep(SFT):
        def _loss_sums(self, batch):
            loss_sum, n = super()._loss_sums(batch)
            if self.training and self.global_step == 1:  # the second update's loss is NaN
                loss_sum = loss_sum * float("nan")
            return loss_sum, n

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.snapshots.append({k: v.detach().clone() for k, v in self.policy.state_dict().items()})

    torch.manual_seed(0)
    module = NaNOnSecondStep(policy=str(tiny_model_dir), max_length=48, val_on_start=False,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    module.snapshots = []
    data = SFTDataModule(train={"task": "arithmetic_sft", "n": 32}, batch_size=4)
    trainer = Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="step 2: non-finite model gradient of"):
        trainer.fit(module, datamodule=data)
    assert module.guard.skipped == 1 and trainer.global_step == 3
    first, second, third = module.snapshots
    assert all(torch.equal(first[k], second[k]) for k in first)  # the NaN update changed no weight
    assert any(not torch.equal(second[k], third[k]) for k in first)  # the next one trained
    assert all(torch.isfinite(v).all() for v in third.values())
