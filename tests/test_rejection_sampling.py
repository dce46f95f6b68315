"""Rejection sampling: the keep rule, and a run that survives SIGKILL without losing or duplicating rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lightning_rlhf.algorithms.rejection_sampling import (
    KeepRule, SamplingOptions, _sample_batch, _select, rejection_sample,
)
from lightning_rlhf.models import load_tokenizer
from lightning_rlhf.rewards import CombinedReward

ROWS = [{"prompt": "12+4=?", "answer": "16"}, {"prompt": "2+3=?", "answer": "5"}]


def test_keep_rule_thresholds_duplicates_and_cap():
    reward = CombinedReward({"accuracy": 1.0, "format": 0.5})
    texts = [  # k = 3 per prompt
        "<think>12+4=16</think><answer>16</answer>",   # accuracy 1, format 1 -> total 1.5: kept
        "<think>12+4=16</think><answer>16</answer> ",  # the same response again (after strip): dropped
        "<answer>16</answer>",                         # accuracy 1, format 0 -> total 1.0
        "<think>2+3=6</think><answer>6</answer>",      # wrong: accuracy 0, format 1 -> total 0.5
        "<think>2+3=5</think><answer>5</answer>",      # kept
        "<think>so 2+3=5</think><answer>5</answer>",   # kept unless capped
    ]
    kept = _select(ROWS, texts, reward, 3, KeepRule({"accuracy": 1.0}))
    assert [(p, t) for p, t, *_ in kept] == [(0, texts[0]), (0, texts[2]), (1, texts[4]), (1, texts[5])]
    assert kept[0][2] == {"accuracy": 1.0, "format": 1.0} and kept[0][3] == 1.5  # 1.0 * 1 + 0.5 * 1
    # "total" >= 1.5 needs both rewards; a cap of one per prompt keeps the first that passes
    kept = _select(ROWS, texts, reward, 3, KeepRule({"total": 1.5}, max_per_prompt=1))
    assert [(p, t) for p, t, *_ in kept] == [(0, texts[0]), (1, texts[4])]


class _ScriptedEngine:
    """Returns the next list of texts for each call (k per prompt asked), and records how many prompts came."""

    def __init__(self, calls):
        self.calls, self.prompts_seen = list(calls), []

    def generate(self, model, ids, mask, **_):
        self.prompts_seen.append(ids.shape[0])
        texts = self.calls.pop(0)
        assert len(texts) == ids.shape[0] * 2  # k = 2
        return type("R", (), {"decode": lambda self, tok: texts})()


def test_rounds_sample_again_only_the_prompts_that_kept_nothing(tiny_model_dir):
    tok, reward = load_tokenizer(str(tiny_model_dir)), CombinedReward({"accuracy": 1.0})
    rule = KeepRule({"accuracy": 1.0})
    first = ["<answer>16</answer>", "<answer>15</answer>",   # prompt 0 (12+4): one right -> kept, done
             "<answer>6</answer>", "<answer>7</answer>"]     # prompt 1 (2+3): none right
    second = ["<answer>4</answer>", "<answer>5</answer>"]    # round 2, prompt 1 only: its second is right
    engine = _ScriptedEngine([first, second])
    kept, sampled = _sample_batch(ROWS, None, tok, engine, reward, SamplingOptions(k=2, rounds=3), rule, "cpu")
    assert [(p, t) for p, t, *_ in kept] == [(0, first[0]), (1, second[1])]
    assert engine.prompts_seen == [2, 1] and sampled == 6  # 2 prompts x 2, then 1 prompt x 2; no third round
    # one round (the default): prompt 1 keeps nothing
    engine = _ScriptedEngine([first])
    kept, sampled = _sample_batch(ROWS, None, tok, engine, reward, SamplingOptions(k=2), rule, "cpu")
    assert [p for p, *_ in kept] == [0] and sampled == 4


def test_rounds_below_one_are_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="sampling rounds=0: it must be at least 1"):
        rejection_sample(str(tiny_model_dir), ROWS, {"accuracy": 1.0}, tmp_path / "o.jsonl",
                         sampling=SamplingOptions(rounds=0))


def test_unknown_keep_name_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="keep.min_scores names \\['acuracy'\\]"):
        rejection_sample(str(tiny_model_dir), ROWS, {"accuracy": 1.0}, tmp_path / "o.jsonl",
                         keep=KeepRule({"acuracy": 1.0}))


def _cmd(model, out, n=160):
    return [sys.executable, "-m", "lightning_rlhf", "sample", "--policy", str(model), "--out", str(out),
            "--data", f"{{task: arithmetic, n: {n}, split: val, seed: 1}}", "--rewards", "{format: 1.0}",
            "--keep", "{total: 0.0}", "--k", "3", "--max-new-tokens", "12", "--batch-prompts", "2"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkill_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_model_dir, cli):
    # An uninterrupted run is the reference. A second run is killed with SIGKILL as soon as its first
    # batch is recorded; what a kill between or during writes leaves is appended (a row of an unrecorded
    # batch, a torn line), and the same command is run again: the output must equal the reference.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    ref = tmp_path / "ref.jsonl"
    done = cli.run(_cmd(tiny_model_dir, ref)[1:], cwd=tmp_path, env=env)  # forked: tests/conftest.py
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(_cmd(tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed.jsonl.progress"
    deadline = time.time() + 120
    while not (progress.exists() and progress.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = progress.read_text().count("\n")
    assert 1 <= finished < 80  # killed mid-run: 160 prompts are 80 batches
    with out.open("a") as f:
        # a whole row of the batch whose progress line was never written, then a half-written row
        f.write(json.dumps({"prompt": "x", "completion": "stray", "batch": finished, "prompt_index": 0}) + "\n")
        f.write('{"prompt": "torn')
    done = cli.run(_cmd(tiny_model_dir, out)[1:], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = _lines(out), _lines(ref)
    assert len(got) == len(want) and got == want
    keys = [(r["prompt_index"], r["completion"].strip()) for r in got]
    assert len(keys) == len(set(keys))  # no duplicates
    assert progress.read_text().count("\n") == 80
