"""A catalogue of bad inputs (docs/errors.md): each runs the real command in a subprocess and must end in a
one-line error naming the problem (exit status 2), or, where that is the better behaviour, a counted skip
(a warning that names what was skipped, and a finished run). Never a traceback.

Every case is a tiny config written into its own directory; the bad part is one key, file or flag. A
module-scoped fixture runs all cases through `tests/helpers/run_cases.py`: each command runs in its own process
(forked from one that imported the package once, so a case costs its own work, not the ~5 s of imports; one case
starts a fresh interpreter), a few at a time, and one test per case reads its exit status and stderr. Most fail
before any training (config parse, data setup, model load); the few that train run one rollout step of a
1M-parameter model.

Parser errors (jsonargparse: an unknown class, key or a wrongly typed value) are folded into one line by
`cli.main` (`test_parser_errors_are_one_line`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "helpers"
WORKERS = 3


# ------------------------------------------------------------------------------------------ configs
def grpo(model: Path, d: Path) -> dict:
    """One rollout step of GRPO: 2 prompts x 2 samples of 4 tokens, no reference model, plain SGD."""
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(d / "run")},
        "model": {"class_path": "lightning_rlhf.algorithms.GRPO", "init_args": {
            "policy": str(model), "output_dir": str(d / "out"), "rewards": {"accuracy": 1.0}, "val_on_start": False,
            "rollout": {"num_generations": 2, "max_new_tokens": 4, "max_prompt_length": 32},
            "loss": {"beta": 0.0}, "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}}},
        "data": {"class_path": "lightning_rlhf.data.PromptDataModule",
                 "init_args": {"train": {"task": "arithmetic", "n": 8}, "batch_size": 2}},
    }


def ppo(model: Path, d: Path) -> dict:
    cfg = grpo(model, d)
    cfg["model"]["class_path"] = "lightning_rlhf.algorithms.PPO"
    cfg["model"]["init_args"]["rollout"]["num_generations"] = 1
    return cfg


def sft(model: Path, d: Path) -> dict:
    cfg = grpo(model, d)
    cfg["model"] = {"class_path": "lightning_rlhf.algorithms.SFT", "init_args": {
        "policy": str(model), "output_dir": str(d / "out"), "val_on_start": False, "max_length": 48}}
    cfg["data"] = {"class_path": "lightning_rlhf.data.SFTDataModule",
                   "init_args": {"train": {"task": "arithmetic_sft", "n": 8}, "batch_size": 2}}
    return cfg


def edit(cfg: dict, **changes) -> dict:
    """A copy of `cfg` with dotted keys set (`model__init_args__loss__name`: `__` for `.`)."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def fit(d: Path, cfg: dict, *extra: str, script: Path | None = None) -> list[str]:
    """argv (after the interpreter) of `fit --config <d>/run.yaml` with `cfg` written there."""
    (d / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    head = [str(script)] if script else ["-m", "lightning_rlhf"]
    return [*head, "fit", "--config", str(d / "run.yaml"), *extra]


def jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as they are) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prompts(d: Path, rows: list) -> dict:
    """A prompt source over `d`/train.jsonl holding `rows`."""
    return {"path": str(jsonl(d / "train.jsonl", rows))}


GOOD_ROWS = [{"prompt": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(1, 9)]


# ------------------------------------------------------------------------------------------ models
def tokenizer_variant(src: Path, dst: Path, **config: object) -> Path:
    """A copy of the model dir `src` whose tokenizer_config.json has `config` set (None drops a token), and with
    `chat_template=None` also no chat template file."""
    shutil.copytree(src, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.update(config)
    if "chat_template" in config:
        tc.pop("chat_template")
        (dst / "chat_template.jinja").unlink(missing_ok=True)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny model and its broken variants (tokenizers, missing weights, another vocabulary)."""
    from lightning_rlhf.models import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    no_weights = root / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    return {
        "tiny": Path(tiny_model_dir),
        "no_template": tokenizer_variant(tiny_model_dir, root / "no_template", chat_template=None),
        "no_pad": tokenizer_variant(tiny_model_dir, root / "no_pad", pad_token=None),
        "no_pad_no_eos": tokenizer_variant(tiny_model_dir, root / "no_pad_no_eos", pad_token=None, eos_token=None),
        "no_weights": no_weights,
        "vocab_300": build_tiny_model(root / "vocab_300", vocab_size=300, hidden_size=32, num_layers=1, num_heads=2),
    }


# ------------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """`argv(d, models)` builds the command in the case's dir `d`; `words` must appear in the error line (or, for
    a counted skip, in stderr); `outcome` is "error" (exit 2) or "skip" (exit 0, warning, finished run)."""

    id: str
    kind: str  # config, data, model, reward, filesystem
    argv: Callable[[Path, dict], list[str]]
    words: tuple[str, ...]
    outcome: str = "error"
    parser: bool = False  # a jsonargparse error: multi-line block (see the module docstring)
    check: Callable[[Path], None] | None = None
    marks: tuple = field(default=())
    fresh: bool = False  # run in a new interpreter rather than a fork of the runner


def _export_kept(d: Path) -> None:
    """The export that was there before the full disk is byte-identical, and no partial sibling is left."""
    before, after = d / "reference", d / "out"
    names = sorted(p.name for p in after.iterdir())
    assert names == sorted(p.name for p in before.iterdir()), names
    for name in names:
        assert (after / name).read_bytes() == (before / name).read_bytes(), name
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == [], "a partial export was left behind"


def _disk_full(d: Path, m: dict) -> list[str]:
    """A run whose output_dir already holds an export (the tiny model; a copy kept as `reference`)."""
    shutil.copytree(m["tiny"], d / "out")
    shutil.copytree(m["tiny"], d / "reference")
    return fit(d, grpo(m["tiny"], d), script=HELPERS / "fit_disk_full.py")


def _out_is_file_parent(d: Path, m: dict) -> list[str]:
    (d / "blocker").write_text("a file, not a directory\n")
    return fit(d, edit(grpo(m["tiny"], d), model__init_args__output_dir=str(d / "blocker" / "model")))


def _root_is_file_parent(d: Path, m: dict) -> list[str]:
    (d / "blocker").write_text("a file, not a directory\n")
    return fit(d, edit(grpo(m["tiny"], d), trainer__default_root_dir=str(d / "blocker" / "run")))


def _torn_checkpoint(d: Path, m: dict) -> list[str]:
    """A checkpoint file cut off half-way (as a copy made during a save would be)."""
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "step=2.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    return ["-m", "lightning_rlhf", "export", str(d), "--out", str(d / "model")]


def _finished(d: Path) -> None:
    summary = json.loads((d / "run" / "summary.json").read_text())
    assert summary.get("status") == "finished", summary
    assert (d / "out" / "model.safetensors").is_file()


M = "model__init_args__"
D = "data__init_args__"

CASES = [
    # ---- config
    Case("unknown_recipe", "config", lambda d, m: ["-m", "lightning_rlhf", "fit", "--config",
                                                   "recipes/r1_zero/tiny_arithmetc.yaml"],
         ("tiny_arithmetc.yaml", "does not exist"), fresh=True),
    Case("unknown_model_class", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), model__class_path="lightning_rlhf.algorithms.GRPOO")),
         ("has no attribute 'GRPOO'",), parser=True),
    Case("misspelt_key", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rollout__num_generation": 2})),
         ("does not accept option 'num_generation'",), parser=True),
    Case("wrong_type", "config", lambda d, m: fit(d, grpo(m["tiny"], d), "--trainer.max_steps", "ten"),
         ('"trainer.max_steps"', "Got value: ten"), parser=True),
    Case("unknown_advantage_estimator", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "advantage": {"estimator": "grpoo"}})),
         ("advantage estimator 'grpoo'", "Valid names")),
    Case("unknown_loss", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "loss__name": "ppo_clipp"})),
         ("policy loss 'ppo_clipp'", "Valid names")),
    Case("unknown_kl_estimator", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "loss__kl_kind": "k4"})),
         ("KL estimator 'k4'", "Valid names")),
    Case("unknown_lr_schedule", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "optim": {"lr_schedule": "cosin"}})),
         ("lr schedule 'cosin'", "cosine")),
    Case("mini_batch_does_not_divide", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "optim": {"mini_batch_size": 3}})),
         ("mini_batch_size=3", "4 responses")),
    Case("micro_batch_does_not_divide", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "optim": {"mini_batch_size": 4, "micro_batch_size": 3}})),
         ("micro_batch_size=3", "mini_batch_size=4")),
    Case("grpo_one_generation", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rollout__num_generations": 1})),
         ("num_generations=1", "zero")),
    Case("max_steps_zero", "config", lambda d, m: fit(d, edit(grpo(m["tiny"], d), trainer__max_steps=0)),
         ("trainer.max_steps=0",)),
    Case("negative_temperature", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rollout__temperature": -1.0})),
         ("rollout.temperature=-1.0",)),
    Case("negative_lr", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "optimizer__init_args__lr": -0.1})),
         ("optimizer", "-0.1")),
    Case("epochs_zero", "config", lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "optim": {"epochs": 0}})),
         ("optim.epochs=0",)),
    Case("unknown_dtype", "config", lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "dtype": "float64x"})),
         ("dtype 'float64x'",)),
    Case("lora_rank_zero", "config", lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "lora": {"r": 0}})),
         ("lora.r=0",)),
    Case("batch_size_zero", "config", lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "batch_size": 0})),
         ("batch_size", "got 0")),
    # ---- data
    Case("missing_data_file", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": {"path": str(d / "trian.jsonl")}})),
         ("trian.jsonl", "does not exist")),
    Case("empty_dataset", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, [])})),
         ("train.jsonl", "no rows")),
    Case("empty_prompt", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, GOOD_ROWS[:2] + [
             {"prompt": "  ", "answer": "1"}])})),
         ("train.jsonl:3", "'prompt' is empty")),
    Case("malformed_jsonl_row", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, GOOD_ROWS[:3] + [
             '{"prompt": "1+1=?", "answer": 2'])})),
         ("train.jsonl:4", "malformed JSON")),
    Case("missing_column", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, [
             {"prompt": "1+1=?", "solution": "2"}])})),
         ("train.jsonl:1", "no 'answer' column", "columns")),
    Case("non_numeric_answer", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, GOOD_ROWS[:4] + [
             {"prompt": "8+8=?", "answer": "sixteen"}] + GOOD_ROWS[4:])})),
         ("dropped 1 of 9 rows", "train.jsonl:5", "'accuracy' reward can never match", "'sixteen'"),
         outcome="skip", check=_finished),
    Case("answer_column_is_the_solution", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, [
             {"prompt": r["prompt"], "answer": f"Add them: the sum is {r['answer']}."} for r in GOOD_ROWS])})),
         ("none of its 8 rows", "train.jsonl:1", "'accuracy' reward can never match")),
    Case("prompt_too_long", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": prompts(d, GOOD_ROWS + [
             {"prompt": "+".join(["1"] * 40) + "=?", "answer": "40"}])})),
         ("dropped 1 of 9 rows", "train.jsonl:9", "over rollout.max_prompt_length=32"), outcome="skip",
         check=_finished),
    Case("every_prompt_too_long", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rollout__max_prompt_length": 4})),
         ("none of its 8 rows", "max_prompt_length=4")),
    Case("unknown_task", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": {"task": "arithmetik", "n": 8}})),
         ("task 'arithmetik'", "arithmetic")),
    Case("bad_task_setting", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "train": {"task": "arithmetic", "n": 8, "min_terms": 1}})),
         ("data.init_args.train", "min_terms=1")),
    Case("fewer_rows_than_batch", "data",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{D + "batch_size": 16})),
         ("8 rows", "batch_size=16")),
    Case("directory_without_data", "data",
         lambda d, m: (d / "data").mkdir() or fit(d, edit(grpo(m["tiny"], d), **{D + "train": {
             "path": str(d / "data")}})),
         ("holds no", ".jsonl")),
    # ---- models
    Case("policy_dir_missing", "model",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "policy": str(d / "sft-tiny"),
                                                          M + "produced_by": "recipes/sft/tiny_arithmetic.yaml"})),
         ("sft-tiny", "not found", "recipes/sft/tiny_arithmetic.yaml")),
    Case("checkpoint_without_weights", "model",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "policy": str(m["no_weights"])})),
         ("no_weights", "no model weights")),
    Case("tokenizer_without_chat_template", "model",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "policy": str(m["no_template"])})),
         ("no_template", "no chat template", "ChatML"), outcome="skip", check=_finished),
    Case("tokenizer_without_pad_token", "model",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "policy": str(m["no_pad"])})),
         ("no_pad", "no pad token", "eos"), outcome="skip", check=_finished),
    Case("tokenizer_without_pad_or_eos", "model",
         lambda d, m: fit(d, edit(sft(m["tiny"], d), **{M + "policy": str(m["no_pad_no_eos"])})),
         ("no_pad_no_eos", "neither a pad nor an eos token")),
    Case("critic_vocab_mismatch", "model",
         lambda d, m: fit(d, edit(ppo(m["tiny"], d), **{M + "critic": {"path": str(m["vocab_300"])}})),
         ("vocab_300", "vocabulary of")),
    # ---- rewards
    Case("unknown_reward", "reward",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rewards": {"acuracy": 1.0}})),
         ("reward function 'acuracy'", "accuracy")),
    Case("reward_weight_not_a_number", "reward",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rewards": [{"name": "accuracy", "weight": "high"}]})),
         ("reward 'accuracy'", "weight", "'high'")),
    Case("reward_unknown_setting", "reward",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rewards": [{"name": "accuracy", "max_chars": 5}]})),
         ("reward 'accuracy'", "unknown settings ['max_chars']", "max_answer_chars")),
    Case("reward_model_missing", "reward",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), **{M + "rewards": [
             {"name": "reward_model", "path": str(d / "rm-tiny")}]})),
         ("rm-tiny", "does not exist", "recipes/reward_model")),
    # ---- filesystem
    Case("output_dir_not_writable", "filesystem", _out_is_file_parent, ("blocker", "output_dir", "not a directory")),
    Case("default_root_dir_not_writable", "filesystem", _root_is_file_parent,
         ("blocker", "default_root_dir")),
    Case("disk_full_during_export", "filesystem", _disk_full, ("No space left on device", "out"),
         check=_export_kept),
    # ---- checkpoints (resume and export)
    Case("ckpt_path_missing", "filesystem",
         lambda d, m: fit(d, grpo(m["tiny"], d), "--ckpt_path", str(d / "run" / "checkpoints" / "step=9.ckpt")),
         ("step=9.ckpt", "no such checkpoint file", "last")),
    Case("checkpoint_keep_last_zero", "config",
         lambda d, m: fit(d, edit(grpo(m["tiny"], d), trainer__enable_checkpointing=True, trainer__callbacks=[
             {"class_path": "lightning_rlhf.callbacks.RunCheckpoint", "init_args": {"keep_last": 0}}])),
         ("keep_last=0", "keep at least 1")),
    Case("export_without_checkpoint", "filesystem",
         lambda d, m: ["-m", "lightning_rlhf", "export", str(d), "--out", str(d / "model")],
         ("holds no complete checkpoint", "step=N.ckpt")),
    Case("export_torn_checkpoint", "filesystem", _torn_checkpoint, ("step=2.ckpt", "not a readable checkpoint",
                                                                    "earlier step=N.ckpt")),
    # ---- other commands
    Case("sweep_file_missing", "config", lambda d, m: ["-m", "lightning_rlhf", "sweep", str(d / "grid.yaml")],
         ("grid.yaml", "does not exist")),
    Case("plot_dir_without_metrics", "filesystem",
         lambda d, m: ["-m", "lightning_rlhf", "plot", str(d), "--out", str(d / "p.png")],
         ("has no metrics.csv",)),
    Case("make_tiny_model_vocab_too_small", "config",
         lambda d, m: ["-m", "lightning_rlhf", "make-tiny-model", "--out", str(d / "m"), "--vocab-size", "100"],
         ("vocab_size=100", "too small")),
]


# ------------------------------------------------------------------------------------------ running them
@pytest.fixture(scope="module")
def results(models, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Every case's (dir, exit status, stderr), run by `tests/helpers/run_cases.py`, the training cases first."""
    root = tmp_path_factory.mktemp("bad_inputs")
    order = sorted(CASES, key=lambda c: c.outcome == "error")
    jobs = []
    for c in order:
        d = root / c.id
        d.mkdir()
        jobs.append({"argv": c.argv(d, models), "cwd": str(d), "stdout": str(d / "stdout.txt"),
                     "stderr": str(d / "stderr.txt"), "fresh": c.fresh})
    (root / "jobs.json").write_text(json.dumps(jobs))
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # cases run outside the repo
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(HELPERS / "run_cases.py"), str(root / "jobs.json"), str(WORKERS)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    return {c.id: (root / c.id, code, (root / c.id / "stderr.txt").read_text()) for c, code in zip(order, codes)}


def _error_block(stderr: str) -> str:
    """From the last line that starts with 'error: ' to the end."""
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    return "\n".join(lines[starts[-1]:]) if starts else ""


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, results):
    d, code, err = results[case.id]
    assert "Traceback" not in err, err[-3000:]
    if case.outcome == "skip":
        assert code == 0, err[-3000:]
        for word in case.words:
            assert word in err, (word, err[-3000:])
    else:
        assert code == 2, (code, err[-3000:])
        text = _error_block(err) if case.parser else _last_line(err)
        assert text.startswith("error: "), err[-3000:]
        for word in case.words:
            assert word in text, (word, text)
    if case.check is not None:
        case.check(d)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.parser])
def test_parser_errors_are_one_line(case: Case, results):
    block = _error_block(results[case.id][2])
    assert block and "\n" not in block, block


def test_catalogue_is_documented():
    """docs/errors.md lists every case by its id, under its kind."""
    doc = (REPO / "docs" / "errors.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert missing == [], missing
    assert len(CASES) >= 32 and {c.kind for c in CASES} == {"config", "data", "model", "reward", "filesystem"}


# ------------------------------------------------------------------------------------------ the helpers behind them
def test_write_dir_atomically_swaps_in_a_complete_dir_and_keeps_the_old_one_on_failure(tmp_path):
    import errno

    from lightning_rlhf.errors import NotWritableError
    from lightning_rlhf.models import write_dir_atomically

    out = tmp_path / "model"
    (out / "notes").mkdir(parents=True)
    for name, text in {"model.safetensors": "old", "config.json": "old", "metrics.csv": "log"}.items():
        (out / name).write_text(text)

    def full_disk(d: Path) -> None:
        (d / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / "model.safetensors"))

    with pytest.raises(NotWritableError, match=r"No space left on device \(.*model/model.safetensors\)"):
        write_dir_atomically(out, full_disk)
    def bug(d: Path) -> None:
        (d / "model.safetensors").write_text("half")
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: raised as it is, nothing left behind
        write_dir_atomically(out, bug)
    assert (out / "model.safetensors").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    write_dir_atomically(out, lambda d: (d / "model.safetensors").write_text("new"))
    # new weights; the run log and notes carried over; the old config.json is not mixed with the new weights
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "model.safetensors", "notes"]
    assert (out / "model.safetensors").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_check_writable_names_what_is_in_the_way_and_creates_nothing(tmp_path):
    from lightning_rlhf.errors import NotWritableError
    from lightning_rlhf.models import check_writable

    (tmp_path / "f").write_text("x")
    assert check_writable(tmp_path / "a" / "b", "out") == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    with pytest.raises(NotWritableError, match=r"out '.*f/m' cannot be created: '.*f' is a file"):
        check_writable(tmp_path / "f" / "m", "out")
    with pytest.raises(NotWritableError, match=r"out '.*f' is a file, not a directory"):
        check_writable(tmp_path / "f", "out")


def test_locate_row_gives_the_line_of_a_jsonl_row(tmp_path):
    from lightning_rlhf.data.sources import locate_row

    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')  # the blank line is no row
    assert [locate_row({"path": str(f)}, i) for i in range(3)] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert locate_row({"task": "arithmetic", "n": 4}, 2) == "task 'arithmetic' row 2"


@pytest.mark.parametrize("gold, gradable", [("16", True), ("-3", True), ("1,000", True), ("\\frac{1}{2}", True),
                                            ("x = 5", True), ("sixteen", False), ("16 or 17", False),
                                            ("Add them: the sum is 2.", False), ("", False)])
def test_accuracy_reward_knows_which_answers_it_can_never_match(gold, gradable):
    from lightning_rlhf.rewards.rules import AccuracyReward

    assert (AccuracyReward().unscorable({"answer": gold}) is None) == gradable
