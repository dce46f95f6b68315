"""`SampleTable`: a real tiny GRPO fit writes samples.jsonl at the expected steps with group-normalised
advantages; the table rows of a hand-made rollout; the wandb path (a logger with `log_table`); the CLI adds the
callback to the RL stages only, and a configured one replaces it."""

from __future__ import annotations

import inspect
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from lightning_rlhf.algorithms import GRPO
from lightning_rlhf.callbacks import RunSummary, SampleTable, sample_rows
from lightning_rlhf.data import collate_rows
from lightning_rlhf.rewards import REWARDS
from lightning_rlhf.rewards.compose import RewardOutput
from lightning_rlhf.rollout import Rollout

PROMPTS = [{"prompt": "3+4=?", "answer": "7"}, {"prompt": "9-2=?", "answer": "7"}]
TEST_REWARD = "samples_test_length"  # varies within a group, so group advantages are not all 0

if TEST_REWARD not in REWARDS:
    REWARDS.register(TEST_REWARD)(lambda prompts, completions, **_: [float(len(c) % 4) for c in completions])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()  # tiny models: two threads on a busy CPU spin against each other
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_grpo_fit_writes_samples_at_the_expected_steps(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    g = 4
    module = GRPO(policy=str(tiny_model_dir), rewards={TEST_REWARD: 1.0, "format": 0.5},
                  rollout={"num_generations": g, "max_new_tokens": 8}, loss={"beta": 0.0}, val_on_start=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, callbacks=[SampleTable(every_n_steps=2, max_rows=8)])
    trainer.fit(module, train_dataloaders=DataLoader(PROMPTS * 5, batch_size=2, collate_fn=collate_rows))

    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 8 + [2] * 8 + [4] * 8  # steps as in metrics.csv: 0, 2, 4
    keys = {"step", "group", "prompt", "completion", "reward", f"rewards/{TEST_REWARD}", "rewards/format", "advantage"}
    assert all(set(r) == keys for r in rows)
    for r in rows:
        assert r["prompt"] == PROMPTS[r["group"]]["prompt"]
        assert r["reward"] == pytest.approx(r[f"rewards/{TEST_REWARD}"] + 0.5 * r["rewards/format"])
        assert r[f"rewards/{TEST_REWARD}"] == len(r["completion"]) % 4  # the text is what was scored
    groups = {}
    for r in rows:
        groups.setdefault((r["step"], r["group"]), []).append(r)
    assert len(groups) == 6 and all(len(v) == g for v in groups.values())
    for group in groups.values():
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5)  # (r - mean) / std per group
    assert any(abs(r["advantage"]) > 0.1 for r in rows)


def test_ppo_fit_writes_samples(tiny_model_dir, tmp_path):
    from lightning_rlhf.algorithms import PPO

    torch.manual_seed(0)
    module = PPO(policy=str(tiny_model_dir), rewards={TEST_REWARD: 1.0}, critic={"init": "policy"},
                 rollout={"num_generations": 1, "max_new_tokens": 6}, optim={"epochs": 1}, val_on_start=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, callbacks=[SampleTable(every_n_steps=1)])
    trainer.fit(module, train_dataloaders=DataLoader(PROMPTS * 2, batch_size=2, collate_fn=collate_rows))
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["group"], r["prompt"]) for r in rows] == [(s, i, PROMPTS[i]["prompt"]) for s in (0, 1)
                                                                   for i in (0, 1)]
    assert all(isinstance(r["advantage"], float) and r["reward"] == len(r["completion"]) % 4 for r in rows)


def _hand_rollout(tokenizer, texts, g):
    """A Rollout whose responses are `texts` (right-padded), on a one-token prompt, groups of `g`."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    t = max(map(len, ids))
    resp = torch.tensor([x + [tokenizer.pad_token_id] * (t - len(x)) for x in ids])
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (t - len(x)) for x in ids])
    n = len(texts)
    return Rollout(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1), response_ids=resp,
                   response_mask=mask, logprobs=torch.zeros(n, t), truncated=torch.zeros(n, dtype=torch.bool),
                   group_size=g)


def _last(tokenizer):
    texts = ["7", "seven", "8", "7 7"]
    ro = _hand_rollout(tokenizer, texts, g=2)
    adv = ro.response_mask * torch.tensor([[1.0], [-1.0], [3.0], [0.0]])  # per token, like PPO's GAE
    adv[3, 0] = 2.0  # row 3: tokens [2, 0, ...] -> mean over its real tokens
    rewards = RewardOutput(total=torch.tensor([1.0, 0.0, 0.5, 1.0]),
                           per_reward={"accuracy": torch.tensor([1.0, 0.0, 0.0, 1.0])}, errors=0)
    return texts, ro, {"prompts": ["a?", "b?"], "rollout": ro, "rewards": rewards, "advantages": adv}


def test_sample_rows_of_a_hand_made_rollout(tiny_tokenizer):
    texts, ro, last = _last(tiny_tokenizer)
    rows = sample_rows(last, tiny_tokenizer, step=3, max_rows=3)  # 3 rows -> whole groups: 2
    assert [(r["group"], r["prompt"]) for r in rows] == [(0, "a?"), (0, "a?")]
    rows = sample_rows(last, tiny_tokenizer, step=3, max_rows=16)
    assert [r["completion"].strip() for r in rows] == texts
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.5, 1.0] and rows[1]["rewards/accuracy"] == 0.0
    n3 = int(ro.response_mask[3].sum())
    assert [r["advantage"] for r in rows][:3] == [1.0, -1.0, 3.0]
    assert rows[3]["advantage"] == pytest.approx(2.0 / n3)
    assert sample_rows(last, tiny_tokenizer, step=0, max_rows=1)[0]["group"] == 0  # a part of one group


class FakeWandb:
    """A logger with WandbLogger's `log_table`, recording its calls."""

    def __init__(self):
        self.calls = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.calls.append({"key": key, "columns": columns, "data": data, "step": step})


def test_table_goes_to_loggers_with_log_table_and_to_jsonl_on_rank_zero(tiny_tokenizer, tmp_path):
    _, _, last = _last(tiny_tokenizer)
    fake = FakeWandb()
    cb = SampleTable(every_n_steps=2, max_rows=4)
    module = SimpleNamespace(last_rollout=last, tokenizer=tiny_tokenizer)
    for global_step, rank0 in [(1, True), (2, True), (3, False), (3, True), (5, True)]:  # steps 0 1 2 2 4
        trainer = SimpleNamespace(global_step=global_step, is_global_zero=rank0, default_root_dir=tmp_path,
                                  loggers=[fake])
        cb.on_train_batch_end(trainer, module, None, None, 0)
    assert [c["step"] for c in fake.calls] == [0, 2, 4] and {c["key"] for c in fake.calls} == {"samples"}
    call = fake.calls[0]
    assert call["columns"] == ["step", "group", "prompt", "completion", "reward", "rewards/accuracy", "advantage"]
    assert len(call["data"]) == 4 and call["data"][0][:3] == [0, 0, "a?"]
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[4])["step"] == 2
    assert [json.loads(lines[0])[c] for c in call["columns"]] == call["data"][0]
    # the same keyword call binds to Lightning's WandbLogger.log_table
    inspect.signature(WandbLogger.log_table).bind(None, **{k: call[k] for k in ("key", "columns", "data", "step")})
    SampleTable(every_n_steps=0).on_train_batch_end(trainer, module, None, None, 0)  # 0: off
    assert len(fake.calls) == 3


def _cli_grpo(tiny_model_dir, root, *extra):
    from lightning_rlhf.lightning_cli import RLHFCLI

    return RLHFCLI(args=[
        "fit", "--config", "recipes/quickstart_grpo.yaml", "--model.init_args.policy", str(tiny_model_dir),
        "--model.init_args.output_dir", "null", "--model.init_args.val_on_start", "false",
        "--model.init_args.rollout.num_generations", "2", "--model.init_args.rollout.max_new_tokens", "4",
        "--model.init_args.optim.mini_batch_size", "4", "--data.init_args.batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
        *extra])


def test_cli_adds_the_table_to_rl_stages_and_a_configured_one_replaces_it(tiny_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from lightning_rlhf.lightning_cli import RLHFCLI

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(sys, "argv", ["lightning_rlhf"])  # LightningCLI warns when both argv and args are given
    sft = RLHFCLI(args=["--config", "recipes/quickstart.yaml", "--model.init_args.policy", str(tiny_model_dir),
                        "--trainer.default_root_dir", str(tmp_path / "sft")], run=False)
    assert not any(isinstance(c, SampleTable) for c in sft.trainer.callbacks)  # not for SFT
    cli = _cli_grpo(tiny_model_dir, tmp_path / "default")
    tables = [c for c in cli.trainer.callbacks if isinstance(c, SampleTable)]
    assert len(tables) == 1 and tables[0].every_n_steps == 10
    assert any(isinstance(c, RunSummary) for c in cli.trainer.callbacks)
    steps = {json.loads(line)["step"] for line in (tmp_path / "default" / "samples.jsonl").read_text().splitlines()}
    assert steps == {0}
    cli = _cli_grpo(tiny_model_dir, tmp_path / "every", "--trainer.callbacks+=lightning_rlhf.callbacks.SampleTable",
                    "--trainer.callbacks.every_n_steps=1")
    tables = [c for c in cli.trainer.callbacks if isinstance(c, SampleTable)]
    assert len(tables) == 1 and tables[0].every_n_steps == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "every" / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [0, 1]
