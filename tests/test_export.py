"""`python -m lightning_rlhf export CKPT --out DIR`: a checkpoint's trained model as an HF directory.

GRPO, PPO (policy + critic) and SFT exports are compared with the run's own export in tests/test_resume.py;
here a LoRA reward model (merged, and as an adapter) and the errors a user can meet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_rlhf.errors import DataError, MissingFileError
from lightning_rlhf.export import export_checkpoint, find_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_export_a_lora_reward_model_checkpoint_merged_and_as_adapter(tiny_model_dir, tmp_path, cli):
    cfg = {"seed_everything": 0,
           "trainer": {"accelerator": "cpu", "max_steps": 3, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
                       "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path)},
           "model": {"class_path": "lightning_rlhf.algorithms.RewardModel", "init_args": {
               "model": str(tiny_model_dir), "output_dir": str(tmp_path / "rm"), "max_length": 64,
               "val_on_start": False, "lora": {"r": 4, "alpha": 8}}},
           "data": {"class_path": "lightning_rlhf.data.PreferenceDataModule", "init_args": {
               "train": {"task": "arithmetic_pairs", "n": 24, "split": "train", "seed": 0}, "batch_size": 8}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    done = cli.run(["-m", "lightning_rlhf", "fit", "--config", str(tmp_path / "run.yaml")], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert find_checkpoint(tmp_path).name == "step=3.ckpt"  # saved at the end of fit

    export_checkpoint(tmp_path, tmp_path / "merged")
    want, have = load_file(tmp_path / "rm" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert want.keys() == have.keys() and all(torch.allclose(want[k], have[k], atol=1e-7) for k in want)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    # the merged weights moved away from the base: the adapters trained and were merged in
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    moved = [k for k in base if k in have and not torch.equal(base[k], have[k])]
    assert any("q_proj" in k for k in moved), moved

    export_checkpoint(tmp_path / "checkpoints" / "step=3.ckpt", tmp_path / "adapter", lora_export="adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_export_names_what_is_wrong(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(MissingFileError, match=r"holds no complete checkpoint \(step=N.ckpt\)"):
        find_checkpoint(tmp_path / "run")
    torn = tmp_path / "run" / "checkpoints" / "step=2.ckpt"
    torn.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(DataError, match="is not a readable checkpoint .* use an earlier step=N.ckpt"):
        export_checkpoint(tmp_path / "run", tmp_path / "out")
    torch.save({"state_dict": {}}, torn)
    with pytest.raises(DataError, match="has no lightning_rlhf model record"):
        export_checkpoint(torn, tmp_path / "out")
    assert not (tmp_path / "out").exists()
