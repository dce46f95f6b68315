"""Exact resume: a run SIGKILLed after step k and resumed with `--ckpt_path last` ends, at step N, with the same
logged metrics (1e-6) and the same weights as an uninterrupted run with the same seed. GRPO (sampling from
torch's generator, not keyed, so the RNG states must come back), PPO (adaptive KL on: its coefficient must come
back), SFT (dropout on), GRPO with LoRA (the checkpoint holds the adapters, not the frozen base) and GRPO on 2
data-parallel ranks. Each crosses an epoch boundary and uses AdamW with a warmup-cosine schedule, so optimizer
and scheduler states matter;
`export` of the last checkpoint equals the run's own export. Also: a kill half-way through writing a checkpoint
leaves the previous one loadable, and the run resumes from it.

Each run is a real `fit` in its own process (tests/helpers/fit_with_test_rewards.py, whose `kill_callbacks`
send the SIGKILL from inside the run at a chosen point), forked from a server that imported the package once
(the `cli` fixture, tests/conftest.py).
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.compare import assert_runs_close

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "helpers" / "fit_with_test_rewards.py"
STEPS = 6


def config(stage: str, model_dir: Path, out: Path, callbacks: list[dict]) -> dict:
    """A 6-step run, 4 batches per epoch, a checkpoint every 2 steps, validation every 3."""
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.01}}
    common = {"policy": str(model_dir), "output_dir": str(out / "model"), "val_on_start": True, "optimizer": adamw}
    rl_data = {"class_path": "lightning_rlhf.data.PromptDataModule", "init_args": {
        "train": {"task": "arithmetic", "n": 16, "split": "train", "seed": 0},
        "val": {"task": "arithmetic", "n": 4, "split": "val", "seed": 1}, "batch_size": 4, "val_batch_size": 4,
        "seed": 3}}
    optim = {"epochs": 2, "mini_batch_size": 8, "micro_batch_size": 4, "lr_schedule": "cosine", "warmup_steps": 2}
    if stage in ("grpo", "grpo_lora"):
        model = {"class_path": "lightning_rlhf.algorithms.GRPO", "init_args": {
            **common, "rewards": {"digit_share": 1.0}, "rollout": {"num_generations": 4, "max_new_tokens": 8},
            "loss": {"beta": 0.1}, "optim": optim}}
        if stage == "grpo_lora":  # the checkpoint keeps the adapters; the base weights come from the source
            model["init_args"]["lora"] = {"r": 4, "alpha": 8}
        data = rl_data
    elif stage == "ppo":
        model = {"class_path": "lightning_rlhf.algorithms.PPO", "init_args": {
            **common, "rewards": {"digit_share": 1.0}, "rollout": {"num_generations": 2, "max_new_tokens": 8},
            "loss": {"beta": 0.05}, "adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 100, "optim": optim,
            "critic": {"output_dir": str(out / "critic")}, "critic_optimizer": adamw}}
        data = rl_data
    else:
        model = {"class_path": "lightning_rlhf.algorithms.SFT", "init_args": {
            **common, "lr_schedule": "cosine", "warmup_steps": 2, "val_max_new_tokens": 4}}
        data = {"class_path": "lightning_rlhf.data.SFTDataModule", "init_args": {
            "train": {"task": "arithmetic_sft", "n": 16, "split": "train", "seed": 0},
            "val": {"task": "arithmetic_sft", "n": 4, "split": "val", "seed": 1}, "batch_size": 4,
            "val_batch_size": 4, "seed": 3}}
    callbacks = [{"class_path": "lightning_rlhf.callbacks.RunCheckpoint", "init_args": {"every_n_steps": 2,
                                                                                         "keep_last": 2}}] + callbacks
    trainer = {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "log_every_n_steps": 1,
               "val_check_interval": 3, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
               "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(out),
               "callbacks": callbacks}
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


def on_two_ranks(cfg: dict) -> dict:
    """The same global batch on 2 gloo ranks (2 prompts each), sampled with a key so ranks draw as one process."""
    cfg["trainer"]["devices"] = 2
    cfg["trainer"]["strategy"] = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                  "init_args": {"process_group_backend": "gloo", "find_unused_parameters": True}}
    cfg["data"]["init_args"]["batch_size"] = 2
    cfg["model"]["init_args"]["rollout"]["sampling_seed"] = 0
    return cfg


def fit(cli, stage: str, model_dir: Path, out: Path, callbacks: list[dict] = (), *extra: str,
        ranks: int = 1) -> subprocess.CompletedProcess:
    """The run in a child of the `cli` fixture's fork server (PYTHONHASHSEED 0), one thread, torch's own float32
    linear: the oneDNN-or-MKL choice is timed per process (`models/cpu_linear.py`), and a busy machine could
    time the two runs of a comparison apart."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(stage, model_dir, out, list(callbacks))
    (out / "run.yaml").write_text(yaml.safe_dump(on_two_ranks(cfg) if ranks == 2 else cfg))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "LIGHTNING_RLHF_ONEDNN": "0"}
    return cli.run([str(SCRIPT), "fit", "--config", str(out / "run.yaml"), *extra], cwd=ROOT, env=env)


def kill_at(step: int) -> dict:
    return {"class_path": "kill_callbacks.KillAtStep", "init_args": {"step": step}}


def results(out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(metrics.csv rows that hold a value, final weights of every exported model)."""
    with open(out / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    weights = load_file(out / "model" / "model.safetensors")
    if (out / "critic").exists():
        weights.update({f"critic.{k}": v for k, v in load_file(out / "critic" / "model.safetensors").items()})
    return rows, weights


def assert_same(one: Path, two: Path) -> list[dict]:
    """Every logged value of every row (train and val, in order) within 1e-6 (relative above 1), but the
    timings; every weight within 1e-6."""
    (rows1, w1), (rows2, w2) = results(one), results(two)
    assert_runs_close(rows1, rows2, w1, w2, keep=lambda k: not k.startswith("perf/"), tol=1e-6)
    return rows1


@pytest.mark.slow
@pytest.mark.parametrize("stage,kill", [("grpo", 5), ("ppo", 3), ("sft", 3), ("grpo_lora", 3)])
def test_sigkill_then_resume_equals_uninterrupted(stage, kill, tiny_model_dir, tmp_path, cli):
    whole = fit(cli, stage, tiny_model_dir, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "killed"
    killed = fit(cli, stage, tiny_model_dir, run, [kill_at(kill)])
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no clean-up ran
    saved = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    last = 2 * (kill // 2)  # every 2 steps: step 4 after a kill at 5 (an epoch's end), step 2 after 3 (mid-epoch)
    assert f"step={last}.ckpt" in saved
    resumed = fit(cli, stage, tiny_model_dir, run, [], "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run / "previous").exists()  # resumed in place: the killed run's files were kept and continued
    rows = assert_same(tmp_path / "whole", run)
    assert max(int(r["step"]) for r in rows) == STEPS - 1  # step g is logged at g - 1, as Lightning does
    # the newest two checkpoints are kept: steps 4 and 6 (6 saved at the end)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["step=4.ckpt", "step=6.ckpt"]
    if stage == "grpo_lora":  # the frozen base weights are recorded by identity, not stored
        ckpt = torch.load(run / "checkpoints" / "step=6.ckpt", weights_only=True)
        base = ckpt["lightning_rlhf"]["frozen"]["policy"]["keys"]
        assert base and not set(base) & set(ckpt["state_dict"])
        assert any("lora_A" in k for k in ckpt["state_dict"]) and not any("lora_A" in k for k in base)
    if stage == "ppo":  # the adaptive controller moved beta, and it came back from the checkpoint
        assert float([r for r in rows if "train/kl_coef" in r][-1]["train/kl_coef"]) != 0.05
    # `export` of the last checkpoint writes the same models as the run's own export at the end
    exported = cli.run(["-m", "lightning_rlhf", "export", str(run), "--out", str(tmp_path / "exported")], cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-3000:]
    for name, got in (("model", tmp_path / "exported"), ("critic", tmp_path / "exported" / "critic")):
        if (run / name).exists():
            want = load_file(run / name / "model.safetensors")
            have = load_file(got / "model.safetensors")
            assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want), name
            assert (got / "tokenizer.json").exists()


@pytest.mark.slow
def test_sigkill_then_resume_on_two_ranks_equals_uninterrupted(tiny_model_dir, tmp_path, cli):
    """Data parallel (2 gloo ranks): each rank restores its RNG and its share of the epoch's prompt order."""
    whole = fit(cli, "grpo", tiny_model_dir, tmp_path / "whole", ranks=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    killed = fit(cli, "grpo", tiny_model_dir, run, [kill_at(3)], ranks=2)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["step=2.ckpt"]  # mid-epoch
    resumed = fit(cli, "grpo", tiny_model_dir, run, [], "--ckpt_path", "last", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(tmp_path / "whole", run)


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, cli):
    run = tmp_path / "killed"
    # saves come at steps 2, 4 and 6: the second (step 4) is killed half-way through writing its file
    killed = fit(cli, "grpo", tiny_model_dir, run, [{"class_path": "kill_callbacks.KillInSave", "init_args": {"nth": 2}}])
    assert killed.returncode == -9, killed.stderr[-3000:]
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files[0] == "step=2.ckpt" and len(files) == 2 and files[1].startswith("step=4.ckpt.tmp-"), files
    half = (run / "checkpoints" / files[1]).stat().st_size
    assert 0 < half < (run / "checkpoints" / "step=2.ckpt").stat().st_size  # a torn file, never named step=4.ckpt
    assert torch.load(run / "checkpoints" / "step=2.ckpt", weights_only=True)["global_step"] == 2

    resumed = fit(cli, "grpo", tiny_model_dir, run, [], "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=4.ckpt", "step=6.ckpt"]  # torn file gone
    whole = fit(cli, "grpo", tiny_model_dir, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same(tmp_path / "whole", run)


def test_resume_refuses_a_different_reference_and_restores_the_same_one():
    from lightning_rlhf.algorithms.resume import drop_frozen, frozen_entries, identity, restore_frozen
    from lightning_rlhf.errors import ConfigError

    torch.manual_seed(0)
    ref, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ident = identity(frozen_entries(ref, "ref", everything=True), "ckpt/sft")
    # fingerprint = [elements, sum, sum of squares] over weight (2x3) and bias (2): 8 elements
    w = torch.cat([ref.weight.flatten(), ref.bias]).detach().double()
    assert ident["fingerprint"] == pytest.approx([8.0, float(w.sum()), float((w * w).sum())])
    assert ident["keys"] == ["ref.bias", "ref.weight"]
    ckpt = {"state_dict": {"policy.w": torch.ones(1), "ref.weight": ref.weight, "ref.bias": ref.bias}}
    drop_frozen(ckpt, {"ref": ident})
    assert list(ckpt["state_dict"]) == ["policy.w"]  # the frozen weights are not stored, their identity is
    theirs = frozen_entries(other, "ref", everything=True)
    with pytest.raises(ConfigError, match="trained against the frozen ref weights from 'ckpt/sft'.* whose weights differ"):
        restore_frozen(ckpt, {"ref": (theirs, identity(theirs, "ckpt/other"))})
    restore_frozen(ckpt, {"ref": (frozen_entries(ref, "ref", everything=True), ident)})  # back for strict loading
    assert torch.equal(ckpt["state_dict"]["ref.weight"], ref.weight)


def test_lora_keeps_only_the_base_weights_out():
    """Under LoRA the frozen base weights are the entries without gradient; the adapters stay in the checkpoint."""
    from lightning_rlhf.algorithms.resume import frozen_entries

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    assert sorted(frozen_entries(model, "policy")) == ["policy.0.bias", "policy.0.weight"]
