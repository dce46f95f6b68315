"""GRPO stage: one update on a fixed rollout equals the formulas applied by hand; step counting; plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms import GRPO
from lightning_rlhf.models import load_causal_lm
from lightning_rlhf.models.chat import encode_prompts
from lightning_rlhf.data import collate_rows
from lightning_rlhf.rewards.compose import RewardOutput
from lightning_rlhf.rollout import sequence_logprobs

PROMPTS = [{"prompt": "3+4=?", "answer": "7"}, {"prompt": "9-2=?", "answer": "7"}]


def _trainer(tmp_path, max_steps=1):
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   default_root_dir=tmp_path)


def _loader():
    return DataLoader(PROMPTS, batch_size=2, collate_fn=collate_rows)


def _fixed_rollout(module, g):
    torch.manual_seed(0)
    ids, mask = encode_prompts(module.tokenizer, [p["prompt"] for p in PROMPTS], 32)
    tok = module.tokenizer
    return module.engine.generate(module.policy, ids, mask, num_generations=g, max_new_tokens=6,
                                  temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


class _GradCapturingGRPO(GRPO):
    """Records the gradients the optimizer is about to apply."""

    def on_before_optimizer_step(self, optimizer):
        self.captured = [p.grad.detach().clone() for p in self.policy.parameters()]


def test_one_update_equals_hand_formulas(tiny_model_dir, tmp_path, monkeypatch):
    g, beta, clip, lr = 4, 0.5, 0.2, 1e-2
    # A reference that differs from the policy (at the policy itself the k3 gradient is 0 and untested).
    from lightning_rlhf.models import load_causal_lm, load_tokenizer, save_hf

    ref_model = load_causal_lm(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_hf(ref_model, load_tokenizer(tiny_model_dir), tmp_path / "ref")
    module = _GradCapturingGRPO(policy=str(tiny_model_dir), ref_model=str(tmp_path / "ref"), rewards={"format": 1.0},
                                rollout={"num_generations": g, "max_new_tokens": 6},
                                loss={"beta": beta, "clip_low": clip}, optim={"max_grad_norm": None},
                                optimizer=lambda p: torch.optim.AdamW(p, lr=lr), val_on_start=False)
    ro = _fixed_rollout(module, g)
    # Make the "old" policy differ from the current one so some ratios leave [0.8, 1.2] and get clipped.
    torch.manual_seed(1)
    ro.logprobs = torch.where(ro.response_mask > 0, ro.logprobs + 0.4 * torch.randn_like(ro.logprobs), 0.0)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    out = RewardOutput(total=rewards, per_reward={"format": rewards}, errors=0)
    monkeypatch.setattr(module, "rollout_and_score", lambda batch: (ro, out))

    policy0 = copy.deepcopy(module.policy)
    _trainer(tmp_path).fit(module, train_dataloaders=_loader())

    # By hand. Group 1 rewards [1,0,0,0]: mean 0.25, unbiased std = sqrt((0.5625+3*0.0625)/3) = 0.5
    #   -> A = [1.5, -0.5, -0.5, -0.5].  Group 2 [1,1,0,1]: mean 0.75, std 0.5 -> A = [0.5, 0.5, -1.5, 0.5].
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -1.5, 0.5])
    mask = ro.response_mask
    logp = sequence_logprobs(policy0, ro)
    with torch.no_grad():
        ref = sequence_logprobs(ref_model, ro)
    ratio = torch.exp(logp - ro.logprobs)
    a = adv[:, None]
    surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    d = ref - logp
    k3 = torch.exp(d) - d - 1
    loss = ((surrogate + beta * k3) * mask).sum() / mask.sum()  # token-mean over all real tokens
    assert ((ratio - 1).abs() > clip)[mask > 0].any(), "the test should exercise clipping"
    loss.backward()
    for (name, p_hand), g_trained in zip(policy0.named_parameters(), module.captured):
        torch.testing.assert_close(g_trained, p_hand.grad, atol=1e-6, rtol=1e-4, msg=name)
    # ... and the optimizer applied it: the weights moved.
    assert any((p0 - p1).abs().max() > 0 for p0, p1 in zip(policy0.parameters(), module.policy.parameters()))

def test_global_step_counts_rollouts_and_optimizer_steps_per_minibatch(tiny_model_dir, tmp_path):
    # 2 prompts x G=4 = 8 responses; mini-batches of 4 -> 2 per pass; 2 passes -> 4 optimizer steps per rollout.
    module = GRPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, rollout={"num_generations": 4, "max_new_tokens": 4},
                  loss={"beta": 0.0}, optim={"epochs": 2, "mini_batch_size": 4, "micro_batch_size": 2},
                  val_on_start=False)
    assert module.ref is None  # beta = 0: no reference model is loaded
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=DataLoader(PROMPTS * 3, batch_size=2, collate_fn=collate_rows))
    assert trainer.global_step == 3
    opt = trainer.optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {3 * 4}


def test_batch_size_mismatch_is_named(tiny_model_dir, tmp_path):
    module = GRPO(policy=str(tiny_model_dir), rollout={"num_generations": 4, "max_new_tokens": 2}, loss={"beta": 0.0},
                  optim={"mini_batch_size": 3}, val_on_start=False)
    with pytest.raises(ValueError, match="mini_batch_size=3 does not divide the 8 responses"):
        _trainer(tmp_path).fit(module, train_dataloaders=_loader())


def _digit_share(prompts, completions, **_):
    """Test reward: the share of a completion's characters that are digits (varies across random samples)."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_grpo_raises_a_reward_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    from lightning_rlhf.rewards import REWARDS

    monkeypatch.setitem(REWARDS._items, "digit_share", _digit_share)
    torch.manual_seed(0)
    module = GRPO(policy=str(tiny_model_dir), rewards={"digit_share": 1.0}, rollout={"num_generations": 8,
                  "max_new_tokens": 8}, loss={"beta": 0.0}, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
                  val_on_start=False)
    rewards = []
    module.log_dict = lambda metrics, **kw: rewards.append(metrics["train/reward"])
    prompts = [{"prompt": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(8)]
    _trainer(tmp_path, max_steps=25).fit(module, train_dataloaders=DataLoader(prompts * 25, batch_size=4,
                                                                                collate_fn=collate_rows))
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # a random model writes few digits (about 0.01 of its characters at the start); 25 GRPO steps lift that
    # share many times over (0.013 -> 0.196 when written), which no sampling noise does
    assert last > first + 0.1 and last > 3 * first, (first, last)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce++_baseline"])
def test_the_yaml_key_picks_the_advantage_estimator(tiny_model_dir, estimator):
    from lightning_rlhf.functional import (
        group_advantages, masked_whiten, outcome_rewards, reinforce_pp_baseline_advantages, rloo_advantages,
    )

    module = GRPO(policy=str(tiny_model_dir), loss={"beta": 0.0}, advantage={"estimator": estimator},
                  val_on_start=False)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 3 + [[1.0, 0.0, 0.0]] * 3)
    adv, _ = module.advantages(outcome_rewards(scores, mask), mask, group_size=3)
    per_row = {
        "grpo": lambda: group_advantages(scores, 3),
        "dr_grpo": lambda: group_advantages(scores, 3, scale_by_std=False),
        # by hand: group 1 [1, 0, 0] -> leave-one-out baselines [0, 0.5, 0.5] -> A = [1, -0.5, -0.5]
        "rloo": lambda: rloo_advantages(scores, 3),
    }
    if estimator in per_row:
        expected = torch.where(mask > 0, per_row[estimator]()[:, None], 0.0)
    else:
        expected = reinforce_pp_baseline_advantages(scores, mask, 3, eps=1e-6)
        assert torch.allclose(expected, masked_whiten(expected, mask), atol=1e-5)  # whitened: mean 0, std 1
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)
    if estimator == "rloo":
        assert adv[:3, 0].tolist() == [1.0, -0.5, -0.5]


def test_misspelt_registry_names_fail_at_construction(tiny_model_dir):
    from lightning_rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown policy loss 'grp'. Valid names: grpo, ppo_clip"):
        GRPO(policy=str(tiny_model_dir), loss={"name": "grp"})
    with pytest.raises(ConfigError, match=r"unknown loss aggregation 'mean'"):
        GRPO(policy=str(tiny_model_dir), loss={"agg": "mean"})
    with pytest.raises(ConfigError, match="optim.epochs=0"):
        GRPO(policy=str(tiny_model_dir), optim={"epochs": 0})
    with pytest.raises(ConfigError, match=r"LossOptions: unknown keys \['bta'\]"):
        GRPO(policy=str(tiny_model_dir), loss={"bta": 0.1})


def test_old_logprobs_are_recomputed_when_sampling_precision_differs(tiny_model_dir, tmp_path):
    def run(**kw):
        module = GRPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, loss={"beta": 0.0}, val_on_start=False,
                      rollout={"num_generations": 4, "max_new_tokens": 6, **kw.pop("rollout", {})}, **kw)
        logged = {}
        module.log_dict = lambda metrics, **_: logged.update(metrics)
        _trainer(tmp_path).fit(module, train_dataloaders=_loader())
        return module, logged

    module, logged = run()  # float32 throughout: auto keeps the sampling log-probs
    assert not module.recompute_old_logprobs() and "train/old_logprob_diff" not in logged
    module, logged = run(optim={"old_logprobs": "recompute"})  # same precision: they agree to float32 rounding
    assert logged["train/old_logprob_diff"] < 1e-5
    module, logged = run(rollout={"dtype": "bfloat16"})  # bf16 sampling, fp32 training: auto recomputes
    assert module.recompute_old_logprobs() and 1e-5 < logged["train/old_logprob_diff"] < 0.1
    assert logged["train/clip_fraction"] == 0.0  # with the recomputed old log-probs the first ratio is 1


def test_releasing_the_references_weights_changes_no_number(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lightning_rlhf.algorithms.resume import KEY, fingerprint
    from lightning_rlhf.models import reloadable

    def run(**kw):
        torch.manual_seed(0)
        module = GRPO(policy=str(tiny_model_dir), rewards={"format": 1.0}, loss={"beta": 0.1}, val_on_start=False,
                      rollout={"num_generations": 4, "max_new_tokens": 6}, **kw)
        logged = {}
        module.log_dict = lambda metrics, **_: logged.update(metrics)
        trainer = _trainer(tmp_path, max_steps=2)
        trainer.fit(module, train_dataloaders=DataLoader(PROMPTS * 2, batch_size=2, collate_fn=collate_rows))
        return module, trainer, logged

    _, _, kept = run(release_ref_pages=False)
    module, trainer, dropped = run(release_ref_pages=True)
    assert all(p.numel() == 0 for p in module.ref.parameters())  # out of memory between steps
    capsys.readouterr()
    by_default, _, _ = run()  # the tiny reference (4 MB) is under AUTO_RELEASE_BYTES: it stays
    assert all(p.numel() > 0 for p in by_default.ref.parameters())
    assert "beta 0.1 (k3, reference loaded)" in capsys.readouterr().out  # the plan printout says which
    monkeypatch.setattr(reloadable, "AUTO_RELEASE_BYTES", 1)
    by_default, _, _ = run()
    assert all(p.numel() == 0 for p in by_default.ref.parameters())
    assert "beta 0.1 (k3, reference loaded, released between uses)" in capsys.readouterr().out
    kept_anyway, _, _ = run(release_ref_pages=False)
    assert all(p.numel() > 0 for p in kept_anyway.ref.parameters())
    assert dropped["train/kl"] == kept["train/kl"] and dropped["train/loss"] == kept["train/loss"]
    trainer.save_checkpoint(tmp_path / "released.ckpt")  # records the reference by identity, not as weights
    saved = torch.load(tmp_path / "released.ckpt", weights_only=False)
    assert not any(k.startswith("ref.") for k in saved["state_dict"])
    loaded = load_causal_lm(str(tiny_model_dir))
    assert saved[KEY]["frozen"]["ref"]["fingerprint"] == fingerprint(loaded.state_dict().values())


@pytest.mark.parametrize("optim, budget_rows, sizes", [({"micro_batch_size": 2}, 3, [3, 3, 2]),
                                                       ({"micro_batch_size": 2}, 1, [2, 2, 2, 2]),
                                                       ({"micro_batch_size": 2}, 100, [8]),
                                                       ({"micro_batch_size": 2, "logprob_micro_batch_size": 8}, 1, [8]),
                                                       ({"micro_batch_size": 2, "logprob_micro_batch_size": 3}, 100,
                                                        [3, 3, 2])])
def test_no_grad_forwards_take_logprob_micro_batch_size_rows_and_give_the_same_numbers(
        tiny_model_dir, monkeypatch, optim, budget_rows, sizes):
    # 2 prompts x G=4 = 8 responses: the reference's forwards take logprob_micro_batch_size rows at a time
    # (3 -> 3 + 3 + 2); unset, as many rows as the logits budget holds (set here to `budget_rows` rows of
    # T x 512 logits), at least micro_batch_size; the log-probs do not depend on the split
    from lightning_rlhf.algorithms import plan, rl_stage

    module = GRPO(policy=str(tiny_model_dir), rollout={"num_generations": 4, "max_new_tokens": 6},
                  loss={"beta": 0.04}, optim=optim, val_on_start=False)
    ro = _fixed_rollout(module, 4)
    monkeypatch.setattr(plan, "NO_GRAD_LOGITS", budget_rows * ro.response_ids.shape[1] * 512 + 511)
    seen = []
    real = rl_stage.sequence_logprobs
    monkeypatch.setattr(rl_stage, "sequence_logprobs",
                        lambda m, part, t: seen.append((len(part), part.group_size)) or real(m, part, t))
    ref = module.reference_logprobs(ro)
    # a chunk of whole groups (8 rows: both prompts' 4) keeps G = 4, so each prompt runs once; others run each row's
    assert seen == [(n, 4 if n % 4 == 0 else 1) for n in sizes]
    with torch.no_grad():
        whole = sequence_logprobs(module.ref, ro, 1.0)
    torch.testing.assert_close(ref, whole, atol=1e-5, rtol=1e-5)
