"""PPO stage: one update on a fixed rollout equals the formulas by hand (each model's gradient from its own
loss only), step counting with two optimizers, whitening, the adaptive KL coefficient, critic loading."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms import PPO
from lightning_rlhf.algorithms import ppo as ppo_mod
from lightning_rlhf.models.chat import encode_prompts
from lightning_rlhf.data import collate_rows
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.rewards.compose import RewardOutput
from lightning_rlhf.rollout import sequence_logprobs

PROMPTS = [{"prompt": "3+4=?", "answer": "7"}, {"prompt": "9-2=?", "answer": "7"}]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: with a busy shared CPU, two intra-op threads spin against each other and a
    # 64-wide matmul takes milliseconds (these tests ran 10x slower). One thread, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, max_steps=1):
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=tmp_path)


def _loader(repeat=1):
    return DataLoader(PROMPTS * repeat, batch_size=2, collate_fn=collate_rows)


def _fixed_rollout(module, g, new_tokens=6):
    torch.manual_seed(0)
    ids, mask = encode_prompts(module.tokenizer, [p["prompt"] for p in PROMPTS], 32)
    tok = module.tokenizer
    return module.engine.generate(module.policy, ids, mask, num_generations=g, max_new_tokens=new_tokens,
                                  temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _perturbed_copy(tiny_model_dir, tmp_path, seed=2):
    """A saved copy of the tiny model with noise on every weight (a reference that differs from the policy)."""
    from lightning_rlhf.models import load_causal_lm, load_tokenizer, save_hf

    model = load_causal_lm(tiny_model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_hf(model, load_tokenizer(tiny_model_dir), tmp_path / "ref")
    return model, str(tmp_path / "ref")


class _GradCapturingPPO(PPO):
    """Records, per optimizer, the gradients it is about to apply."""

    def on_before_optimizer_step(self, optimizer):
        which = "policy" if optimizer is self.trainer.optimizers[0] else "critic"
        model = self.policy if which == "policy" else self.critic
        self.captured.setdefault(which, [p.grad.detach().clone() for p in model.parameters()])


def test_one_update_equals_hand_formulas(tiny_model_dir, tmp_path, monkeypatch):
    g, kl_coef, ent_coef, clip, gamma, lam = 4, 0.5, 0.1, 0.2, 0.9, 0.8
    ref_model, ref_dir = _perturbed_copy(tiny_model_dir, tmp_path)
    module = _GradCapturingPPO(policy=str(tiny_model_dir), ref_model=ref_dir, rewards={"format": 1.0},
                               rollout={"num_generations": g, "max_new_tokens": 6},
                               loss={"name": "ppo_clip", "beta": kl_coef, "kl_kind": "k1", "ent_coef": ent_coef,
                                     "clip_low": clip},
                               advantage={"estimator": "gae", "gamma": gamma, "lam": lam, "whiten": True},
                               optim={"epochs": 1, "max_grad_norm": None},
                               critic={"value_clip": 0.2, "max_grad_norm": None},
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                               critic_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), val_on_start=False)
    module.captured = {}
    ro = _fixed_rollout(module, g)
    torch.manual_seed(1)  # an "old" policy that differs from the current one, so some ratios get clipped
    ro.logprobs = torch.where(ro.response_mask > 0, ro.logprobs + 0.4 * torch.randn_like(ro.logprobs), 0.0)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, -1.0])
    out = RewardOutput(total=scores, per_reward={"format": scores}, errors=0)
    monkeypatch.setattr(module, "rollout_and_score", lambda batch: (ro, out))
    policy0, critic0 = copy.deepcopy(module.policy), copy.deepcopy(module.critic)
    _trainer(tmp_path).fit(module, train_dataloaders=_loader())

    # ---- by hand -----------------------------------------------------------------------------------
    mask = ro.response_mask
    n, p_len, t_len = len(ro), ro.prompt_ids.shape[1], ro.response_ids.shape[1]
    with torch.no_grad():
        ref = sequence_logprobs(ref_model, ro)
    # rewards: -kl_coef * (old logp - ref logp) on every real token, + the score on the last real token
    rewards = -kl_coef * (ro.logprobs - ref) * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(n), last] += scores

    def critic_values(model):  # V for token t = output at position P-1+t
        out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids)
        return out.logits[:, p_len - 1 : p_len + t_len - 1, 0] * mask

    with torch.no_grad():
        v_old = critic_values(critic0)
    adv = torch.zeros(n, t_len)
    for b in range(n):  # GAE, V = 0 after the last real token
        a_next, v_next = 0.0, 0.0
        for t in range(int(last[b]), -1, -1):
            delta = rewards[b, t] + gamma * v_next - v_old[b, t]
            a_next = delta + gamma * lam * a_next
            adv[b, t], v_next = a_next, v_old[b, t]
    returns = (adv + v_old) * mask
    real = adv[mask > 0]
    white = (adv - real.mean()) / (real.var(unbiased=True) + 1e-8).sqrt() * mask

    # policy: token-mean clipped surrogate minus ent_coef * token-mean entropy (one mini-batch, one step)
    logp, extra = sequence_logprobs(policy0, ro, return_logits=True)
    probs = torch.softmax(extra["logits"], -1)
    entropy = -(probs * torch.log_softmax(extra["logits"], -1)).sum(-1)
    ratio = torch.exp(logp - ro.logprobs)
    surrogate = torch.maximum(-white * ratio, -white * ratio.clamp(1 - clip, 1 + clip))
    assert ((ratio - 1).abs() > clip)[mask > 0].any(), "the test should exercise clipping"
    ((surrogate * mask).sum() / mask.sum() - ent_coef * (entropy * mask).sum() / mask.sum()).backward()
    # critic: at the first step V = V_old, so the clipped term equals the plain one: 0.5 * (V - R)^2
    (0.5 * ((critic_values(critic0) - returns) ** 2 * mask).sum() / mask.sum()).backward()

    for model, which in ((policy0, "policy"), (critic0, "critic")):
        for (name, p_hand), g_trained in zip(model.named_parameters(), module.captured[which]):
            torch.testing.assert_close(g_trained, p_hand.grad, atol=1e-6, rtol=1e-4, msg=f"{which}: {name}")
    assert any((a - b).abs().max() > 0 for a, b in zip(critic0.parameters(), module.critic.parameters()))


def test_each_loss_reaches_only_its_own_model(tiny_model_dir):
    torch.manual_seed(0)
    module = PPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, rollout={"num_generations": 2, "max_new_tokens": 6},
                 loss={"name": "ppo_clip", "beta": 0.1, "kl_kind": "k1", "ent_coef": 0.01}, val_on_start=False)
    ro = _fixed_rollout(module, 2)
    targets = module.compute_targets(ro, torch.tensor([1.0, 0.0, -1.0, 0.5]))
    mask = ro.response_mask
    # step 6: advantages whitened over the real tokens: mean 0, (unbiased) std 1
    real = targets["advantages"][mask > 0]
    assert abs(float(real.mean())) < 1e-5 and abs(float(real.std(unbiased=True)) - 1) < 1e-4
    assert (targets["advantages"][mask == 0] == 0).all()

    loss_pi, _ = module.policy_loss(ro, targets["advantages"], None)
    loss_pi.backward()
    assert all(p.grad is None for p in module.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in module.policy.parameters())
    module.policy.zero_grad(set_to_none=True)
    loss_v, _ = module.critic_loss(ro, targets["old_values"], targets["returns"])
    loss_v.backward()
    assert all(p.grad is None for p in module.policy.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in module.critic.parameters())


def test_optimizers_step_per_minibatch_global_step_counts_rollouts_kl_coef_adapts(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    # 2 prompts x G=4 = 8 responses; mini-batches of 4 -> 2 per epoch; 2 epochs -> 4 steps of EACH optimizer
    # per rollout; 3 rollouts -> global_step 3 and Adam's step count 12 for both.
    calls = []
    real_update = ppo_mod.adaptive_kl_coef

    def recording(coef, current_kl, target, horizon, n_steps):
        calls.append((coef, n_steps, real_update(coef, current_kl, target, horizon, n_steps)))
        return calls[-1][2]

    monkeypatch.setattr(ppo_mod, "adaptive_kl_coef", recording)
    module = PPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, rollout={"num_generations": 4, "max_new_tokens": 4},
                 loss={"name": "ppo_clip", "beta": 0.1, "kl_kind": "k1"}, adaptive_kl=True, kl_target=1.0,
                 kl_horizon=80, optim={"epochs": 2, "mini_batch_size": 4, "micro_batch_size": 2}, val_on_start=False,
                 output_dir=str(tmp_path / "policy"), critic={"output_dir": str(tmp_path / "critic")})
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=_loader(repeat=3))
    assert trainer.global_step == 3
    for opt in trainer.optimizers:
        assert {int(s["step"]) for s in opt.state.values()} == {12}
    # the controller ran once per rollout, each time from the previous coefficient, with n = 8 responses
    assert [c[1] for c in calls] == [8, 8, 8]
    assert calls[0][0] == 0.1 and calls[1][0] == calls[0][2] and calls[2][0] == calls[1][2]
    assert module.kl_coef == calls[2][2] != 0.1
    assert float(trainer.callback_metrics["train/kl_coef"]) == pytest.approx(calls[2][0])  # the coef used
    for key in ("train/value_loss", "train/value_clip_fraction", "train/explained_variance", "train/kl",
                "train/entropy", "train/clip_fraction", "train/policy_loss", "train/approx_kl", "train/reward"):
        assert key in trainer.callback_metrics, key
    assert (tmp_path / "policy" / "model.safetensors").exists()
    from lightning_rlhf.models import load_critic

    assert load_critic(tmp_path / "critic").config.num_labels == 1


def test_target_kl_stops_epochs_early_but_global_step_still_counts_rollouts(tiny_model_dir, tmp_path):
    # 8 responses, mini 4 -> 2 mini-batches per epoch; ppo_epochs 3 but a tiny target_kl stops after epoch 1
    # (the policy moved in its first step, so the epoch's approx_kl > 1e-9): 2 steps of each optimizer, and
    # the last one of them still advances global_step.
    torch.manual_seed(0)
    module = PPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, rollout={"num_generations": 4, "max_new_tokens": 4},
                 loss={"name": "ppo_clip", "beta": 0.0}, optim={"epochs": 3, "mini_batch_size": 4}, target_kl=1e-9,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0), val_on_start=False)
    assert module.ref is None  # kl_coef = 0: no reference model is loaded
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 1
    for opt in trainer.optimizers:
        assert {int(s["step"]) for s in opt.state.values()} == {2}
    assert float(trainer.callback_metrics["train/epochs_run"]) == 1.0


def test_critic_init_reward_model_needs_a_reward_model_reward(tiny_model_dir):
    with pytest.raises(ConfigError, match="critic.init='reward_model'.*no reward_model entry"):
        PPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, critic={"init": "reward_model"})
    with pytest.raises(ConfigError, match="critic.init='value_head' is not one of"):
        PPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, critic={"init": "value_head"})


def test_critic_starts_from_the_reward_model_by_default(tiny_model_dir, tmp_path):
    from lightning_rlhf.models import load_reward_model, load_tokenizer, save_hf

    rm = load_reward_model(tiny_model_dir)
    with torch.no_grad():
        rm.score.weight.copy_(torch.linspace(-1, 1, rm.score.weight.numel()).view_as(rm.score.weight))
    save_hf(rm, load_tokenizer(tiny_model_dir), tmp_path / "rm")
    rewards = [{"name": "reward_model", "weight": 1.0, "path": str(tmp_path / "rm")}, {"name": "accuracy"}]
    module = PPO(policy=str(tiny_model_dir), rewards=rewards, loss={"beta": 0.0})
    torch.testing.assert_close(module.critic.score.weight, rm.score.weight)
    assert float(module.critic.score.bias.detach().abs().max()) == 0.0  # the token head's bias starts at 0
    # critic_init: policy gives a fresh head instead
    module = PPO(policy=str(tiny_model_dir), rewards=rewards, loss={"beta": 0.0}, critic={"init": "policy"})
    assert not torch.allclose(module.critic.score.weight, rm.score.weight)


def test_bf16_mixed_on_cpu_recomputes_old_logprobs_and_clips_both_models(tiny_model_dir, tmp_path):
    # trainer.precision is honoured on CPU: bf16 autocast around the step, fp32 master weights; sampling in
    # bf16 makes optim.old_logprobs=auto recompute the old log-probs; gradient clipping works for both optimizers.
    torch.manual_seed(0)
    module = PPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, rollout={"num_generations": 2,
                 "max_new_tokens": 4, "dtype": "bfloat16"}, loss={"name": "ppo_clip", "beta": 0.1},
                 optim={"epochs": 1, "max_grad_norm": 0.5}, critic={"max_grad_norm": 0.5}, val_on_start=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, precision="bf16-mixed")
    trainer.fit(module, train_dataloaders=_loader(repeat=2))
    assert trainer.global_step == 2
    assert 0 < float(trainer.callback_metrics["train/old_logprob_diff"]) < 0.1
    assert next(module.policy.parameters()).dtype == torch.float32
