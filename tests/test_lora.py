"""LoRA through PEFT (`models/lora.py`): options checked with clear errors, only the adapters train, the GRPO
reference is the base model with adapters off (exact at step 0, no second copy), the fast rollout engine samples
a LoRA model exactly as PEFT computes it, SFT with LoRA learns, and both exports reload with equal logits."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms import GRPO, PPO, SFT
from lightning_rlhf.algorithms.stage import export_hf
from lightning_rlhf.data import SFTDataModule, collate_rows
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.models import (
    LoraOptions, apply_lora, load_causal_lm, load_critic, load_reward_model, load_tokenizer, score_sequences,
    token_values, trainable_parameters,
)
from lightning_rlhf.models.chat import encode_prompts
from lightning_rlhf.rewards import REWARDS
from lightning_rlhf.rollout import ROLLOUT_ENGINES, sequence_logprobs

PROMPTS = [{"prompt": "3+4=?", "answer": "7"}, {"prompt": "9-2=?", "answer": "7"}]
LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

if "lora_test_length" not in REWARDS:  # varies on a random model's text, so GRPO's advantages are not all 0
    REWARDS.register("lora_test_length")(lambda prompts, completions, **_: [len(c) % 5 / 4 for c in completions])


def _trainer(tmp_path, steps, **kw):
    kw = {"logger": False, **kw}
    return Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)


def _perturb_adapters(model, seed=0, std=0.2):
    """Non-zero B (PEFT starts it at 0), as after some updates."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def _rollout(module_or_model, tok, engine="static", g=4, greedy=False):
    model = getattr(module_or_model, "policy", module_or_model)
    ids, mask = encode_prompts(tok, [p["prompt"] for p in PROMPTS], 32)
    return ROLLOUT_ENGINES.get(engine)().generate(model, ids, mask, num_generations=1 if greedy else g,
                                                  max_new_tokens=8, greedy=greedy, eos_token_id=tok.eos_token_id,
                                                  pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("bad, match", [({"r": 0}, "lora.r=0"), ({"r": -4}, "lora.r=-4"), ({"alpha": 0}, "alpha"),
                                        ({"dropout": 1.0}, "dropout"), ({"export": "both"}, "merged"),
                                        ({"target_modules": ["q_proj", "qkv"]}, "q_proj"), ({"rank": 8}, "valid keys")])
def test_bad_options_name_the_value_and_the_fix(tiny_model_dir, bad, match):
    with pytest.raises(ConfigError, match=match) as err:
        apply_lora(load_causal_lm(tiny_model_dir), bad)
    if "target_modules" in bad:  # the message lists the model's own linear modules
        assert "['qkv']" in str(err.value) and all(name in str(err.value) for name in LLAMA_LINEARS)


def test_only_adapters_train_and_heads_stay_trainable(tiny_model_dir):
    base = load_causal_lm(tiny_model_dir)
    total0 = sum(p.numel() for p in base.parameters())
    r = 4
    # r * (in + out) per targeted nn.Linear (A is r x in, B is out x r); the lm_head is never a target
    expected = sum(r * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEARS)
    model = apply_lora(base, {"r": r, "alpha": 8})
    trainable, total = trainable_parameters(model)
    assert trainable == expected and total == total0 + expected
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    # reward model / critic: the score head (hidden -> 1, the critic's with a bias) trains in full beside the adapters
    hidden = base.config.hidden_size
    for loader, task, head in ((load_reward_model, "seq_cls", hidden), (load_critic, "token_cls", hidden + 1)):
        scorer = apply_lora(loader(tiny_model_dir), {"r": r}, task)
        assert trainable_parameters(scorer)[0] == expected + head
        assert any("score" in n and p.requires_grad for n, p in scorer.named_parameters())


def test_static_engine_samples_the_lora_model_exactly(tiny_model_dir, tiny_tokenizer):
    model = _perturb_adapters(apply_lora(load_causal_lm(tiny_model_dir), {"r": 4})).eval()
    fast, hf = _rollout(model, tiny_tokenizer, greedy=True), _rollout(model, tiny_tokenizer, "hf", greedy=True)
    assert torch.equal(fast.response_ids, hf.response_ids)  # the PEFT model's own generate, greedy
    real = fast.response_mask > 0
    with torch.no_grad():
        assert (sequence_logprobs(model, fast) - fast.logprobs)[real].abs().max() < 1e-5
        assert (hf.logprobs - fast.logprobs)[real].abs().max() < 1e-5
        torch.manual_seed(0)
        sampled = _rollout(model, tiny_tokenizer, g=8)
        assert (sequence_logprobs(model, sampled) - sampled.logprobs)[sampled.response_mask > 0].abs().max() < 1e-5
        with model.disable_adapter():  # adapters off: exactly the base model's tokens and log-probs
            off = _rollout(model, tiny_tokenizer, greedy=True)
    plain = _rollout(load_causal_lm(tiny_model_dir), tiny_tokenizer, greedy=True)
    assert torch.equal(off.response_ids, plain.response_ids) and torch.equal(off.logprobs, plain.logprobs)


def test_grpo_reference_is_base_kl_starts_at_zero_and_export_reloads(tiny_model_dir, tmp_path):
    module = GRPO(policy=str(tiny_model_dir), rewards={"lora_test_length": 1.0}, lora={"r": 8, "alpha": 16},
                  rollout={"num_generations": 4, "max_new_tokens": 8}, loss={"beta": 0.1}, val_on_start=False,
                  optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2), output_dir=str(tmp_path / "merged"))
    assert module.ref is None and module.ref_is_base  # no second copy of the model
    base, tok = load_causal_lm(tiny_model_dir), module.tokenizer
    torch.manual_seed(0)
    ro = _rollout(module, tok)
    with torch.no_grad():
        base_logp = sequence_logprobs(base, ro)
        assert torch.equal(module.reference_logprobs(ro), base_logp)  # step 0: B = 0, exactly the base
        assert torch.equal(sequence_logprobs(module.policy, ro), base_logp)
    kl = []

    class RecordKL(Callback):
        def on_train_batch_end(self, trainer, *args):
            kl.append(float(trainer.callback_metrics["train/kl"]))

    loader = DataLoader(PROMPTS * 3, batch_size=2, collate_fn=collate_rows)
    _trainer(tmp_path, 3, callbacks=[RecordKL()]).fit(module, train_dataloaders=loader)
    # the first update starts at the reference: KL 0 up to rounding (the no-grad reference pass of a small float32
    # model runs through the one-call step kernel, whose sums differ from the training forward's by ~1e-7)
    assert len(kl) == 3 and abs(kl[0]) < 1e-9 and kl[-1] > 1e-6
    with torch.no_grad():
        assert torch.equal(module.reference_logprobs(ro), base_logp)  # the reference did not move
        policy_logp = sequence_logprobs(module.policy, ro)
        assert (policy_logp - base_logp).abs().max() > 1e-3  # the policy did
        merged = load_causal_lm(tmp_path / "merged")  # the default export: a plain HF directory
        assert type(merged).__name__ == "LlamaForCausalLM"
        assert (sequence_logprobs(merged, ro) - policy_logp).abs().max() < 1e-5


def test_export_merged_and_adapter_reload_with_equal_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    tok = load_tokenizer(tiny_model_dir)
    model = _perturb_adapters(apply_lora(load_causal_lm(tiny_model_dir), {"r": 4})).eval()
    ids = torch.randint(10, 500, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        export_hf(model, tok, str(tmp_path / "m"), None, LoraOptions(export="merged"))
        export_hf(model, tok, str(tmp_path / "a"), None, LoraOptions(export="adapter"))
        assert (tmp_path / "a" / "adapter_config.json").exists() and not (tmp_path / "a" / "config.json").exists()
        adapter = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), tmp_path / "a").eval()
        for reloaded in (load_causal_lm(tmp_path / "m"), adapter, load_causal_lm(tmp_path / "a")):
            assert (reloaded(input_ids=ids).logits - want).abs().max() < 1e-5
        assert torch.equal(model(input_ids=ids).logits, want)  # exporting left the trained model as it was
        # a reward model's merged export keeps its trained score head
        rm = _perturb_adapters(apply_lora(load_reward_model(tiny_model_dir), {"r": 4}, "seq_cls")).eval()
        rm.base_model.model.score.modules_to_save["default"].weight.add_(0.5)
        mask = torch.ones_like(ids)
        export_hf(rm, tok, str(tmp_path / "rm"), None, None)
        reloaded = score_sequences(load_reward_model(tmp_path / "rm"), ids, mask)
        assert (reloaded - score_sequences(rm, ids, mask)).abs().max() < 1e-5


def test_sft_with_lora_lowers_heldout_loss(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = SFT(policy=str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2, weight_decay=0.0),
                 lr_schedule="constant", max_length=64, max_prompt_length=24, val_max_new_tokens=8,
                 lora={"r": 16, "alpha": 32})
    data = SFTDataModule(train={"task": "arithmetic_sft", "n": 256}, val={"task": "arithmetic_sft", "n": 32,
                         "split": "val"}, batch_size=32, val_batch_size=32)
    _trainer(tmp_path, 20, val_check_interval=20, check_val_every_n_epoch=None).fit(module, datamodule=data)
    (_, before), (_, after) = module.eval_history[0], module.eval_history[-1]
    # a random base: frozen embeddings and head make LoRA learn slower than full fine-tuning (6.20 -> 5.91)
    assert after["val/loss"] < before["val/loss"] - 0.1


def test_ppo_with_lora_trains_adapters_and_the_value_head(tiny_model_dir, tmp_path):
    module = PPO(policy=str(tiny_model_dir), rewards={"lora_test_length": 1.0}, lora={"r": 4},
                 rollout={"num_generations": 2, "max_new_tokens": 6}, val_on_start=False,
                 critic={"output_dir": str(tmp_path / "critic")})
    assert module.ref is None and module.ref_is_base
    head = module.critic.base_model.model.score.modules_to_save["default"]
    before = head.weight.detach().clone()
    _trainer(tmp_path, 1).fit(module, train_dataloaders=DataLoader(PROMPTS, batch_size=2, collate_fn=collate_rows))
    assert not torch.equal(head.weight, before)
    ids = torch.randint(10, 500, (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = token_values(load_critic(tmp_path / "critic"), ids, mask)
        assert (got - token_values(module.critic, ids, mask)).abs().max() < 1e-5
