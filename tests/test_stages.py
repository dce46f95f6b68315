"""End-to-end: short SFT and reward-model fits on the tiny model move their metrics the right way."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_rlhf.algorithms import SFT, RewardModel
from lightning_rlhf.models.chat import encode_completions
from lightning_rlhf.data import PreferenceDataModule, SFTDataModule


def _trainer(tmp_path, steps, val_every):
    return Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=val_every,
                   check_val_every_n_epoch=None, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=tmp_path)


def test_encode_completions_masks_prompt_and_padding(tiny_tokenizer):
    enc = encode_completions(tiny_tokenizer, ["1+1=?", "12+30=?"], ["<answer>2</answer>", "x"], max_length=64)
    for i, comp in enumerate(["<answer>2</answer>", "x"]):
        n_comp = len(tiny_tokenizer(comp + tiny_tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        labels = enc["labels"][i]
        assert int((labels != -100).sum()) == n_comp  # only completion + eos tokens carry a label
        real = enc["attention_mask"][i].bool()
        assert (labels[~real] == -100).all()
        last = int(real.nonzero().max())
        assert int(labels[last]) == tiny_tokenizer.eos_token_id  # the eos is learned, so generation stops


def test_sft_lowers_heldout_loss(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = SFT(policy=str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0), warmup_steps=0,
                 lr_schedule="constant", max_length=64,
                 max_prompt_length=24, val_max_new_tokens=24, output_dir=str(tmp_path / "out"))
    data = SFTDataModule(train={"task": "arithmetic_sft", "n": 512}, val={"task": "arithmetic_sft", "n": 32,
                         "split": "val"}, batch_size=32, val_batch_size=32)
    _trainer(tmp_path, steps=40, val_every=40).fit(module, datamodule=data)
    (s0, before), (s1, after) = module.eval_history[0], module.eval_history[-1]
    assert (s0, s1) == (0, 40)
    # an untrained model over a 512-token vocab starts near ln(512) = 6.24 nats per token
    assert before["val/loss"] > 5.0
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert 0.0 <= after["val/accuracy"] <= 1.0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_reward_model_learns_to_rank_format_flaws(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    pairs = {"task": "arithmetic_pairs", "flaws": ["broken_format", "no_reasoning"]}
    module = RewardModel(model=str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0),
                         lr_schedule="constant", max_length=64)
    data = PreferenceDataModule(train={**pairs, "n": 512}, val={**pairs, "n": 64, "split": "val"},
                                batch_size=32, val_batch_size=64)
    _trainer(tmp_path, steps=40, val_every=40).fit(module, datamodule=data)
    before, after = module.eval_history[0][1], module.eval_history[-1][1]
    # chance is 0.5 and a random head scores both sides about equally; these two flaws are visible in the text
    assert after["val/accuracy"] >= 0.9 > before["val/accuracy"]
    assert after["val/loss"] < before["val/loss"] and after["val/margin"] > 1.0


def _bf16_matmul_outputs(model: torch.nn.Module) -> list[torch.dtype]:
    """Record the output dtype of every nn.Linear call (bf16 under autocast, fp32 without)."""
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_supervised_stages_honour_bf16_mixed_on_cpu(tiny_model_dir, tmp_path, monkeypatch, caplog):
    # trainer.precision="bf16-mixed" on a CPU: the training forward runs under bf16 autocast (the Linear layers
    # return bfloat16), the master weights stay float32, and training still lowers the loss. Where this CPU's
    # bf16 matmuls are slow (patched here: 0.7 against 133 GFLOP/s), the fit says so before it trains.
    from lightning_rlhf.algorithms import runtime

    monkeypatch.setattr(runtime, "matmul_gflops", lambda dtype, **_: 0.7 if dtype == torch.bfloat16 else 133.0)
    torch.manual_seed(0)
    sft = SFT(policy=str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
              warmup_steps=0, lr_schedule="constant", max_length=64, max_prompt_length=24, val_max_new_tokens=8)
    seen = _bf16_matmul_outputs(sft.policy)
    data = SFTDataModule(train={"task": "arithmetic_sft", "n": 256}, val={"task": "arithmetic_sft", "n": 16,
                         "split": "val"}, batch_size=32, val_batch_size=16)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=20, val_check_interval=20, check_val_every_n_epoch=None,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path, precision="bf16-mixed")
    trainer.fit(sft, datamodule=data)
    assert "trainer.precision bf16-mixed: bfloat16 0.7 GFLOP/s against float32 133" in caplog.text
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in sft.policy.parameters())
    (_, before), (_, after) = sft.eval_history[0], sft.eval_history[-1]
    assert after["val/loss"] < 0.7 * before["val/loss"]

    rm = RewardModel(model=str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.0),
                     lr_schedule="constant", max_length=64)
    seen = _bf16_matmul_outputs(rm.model)
    pairs = {"task": "arithmetic_pairs", "flaws": ["broken_format"]}
    data = PreferenceDataModule(train={**pairs, "n": 256}, val={**pairs, "n": 32, "split": "val"},
                                batch_size=32, val_batch_size=32)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=20, val_check_interval=20, check_val_every_n_epoch=None,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path / "rm", precision="bf16-mixed")
    trainer.fit(rm, datamodule=data)
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in rm.model.parameters())
    (_, before), (_, after) = rm.eval_history[0], rm.eval_history[-1]
    assert after["val/loss"] < before["val/loss"]


@pytest.mark.parametrize("limit, expected", [
    (3, 3),        # an int: that many batches
    (0.25, 2),     # a share: int(10 * 0.25) = 2 of the 10 batches
    (0.01, 1),     # int(10 * 0.01) = 0, but a share above 0 keeps at least one
    (1.0, None),   # all of them (Lightning's default)
    (0.0, 0),      # validation off
])
def test_step0_validation_honours_limit_val_batches(limit, expected):
    from types import SimpleNamespace

    from lightning_rlhf.algorithms.stage import val_batch_limit

    assert val_batch_limit(SimpleNamespace(limit_val_batches=limit, val_dataloaders=list(range(10)))) == expected
