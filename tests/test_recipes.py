"""Every recipe under recipes/ parses, and the recipes chain: each stage starts from what another writes.

Only parsing and instantiation-time checks run here (no training): `fit --print_config` for every
recipe, the `produced_by` links between recipes, and the error a user sees when a stage's starting
checkpoint has not been produced yet (run in an empty working directory, so `checkpoints/...` is missing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]
ALL_YAML = sorted(REPO.glob("recipes/**/*.yaml"))
PIPELINES = [p for p in ALL_YAML if "stages" in (yaml.safe_load(p.read_text()) or {})]  # `pipeline` files
# files that only add settings to a pipeline (`pipeline plan.yaml on_gpu.yaml`)
SETTINGS_FILES = [p for p in ALL_YAML if p not in PIPELINES
                  and set(yaml.safe_load(p.read_text()) or {}) <= {"precision", "fit_overrides", "sample_overrides"}]
RECIPES = [p for p in ALL_YAML if p not in PIPELINES and p not in SETTINGS_FILES]
RECIPE_IDS = [str(p.relative_to(REPO)) for p in RECIPES]
# `python -m lightning_rlhf make-tiny-model` writes here by default (its `--out` default in commands.py).
TINY_BASE_DEFAULT = "checkpoints/tiny-base"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _norm(v):
    """PyYAML reads `1e-3` (no dot) as a string, jsonargparse prints it as a float: compare as floats."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _start_checkpoint(init_args: dict) -> str | None:
    """The checkpoint a stage starts from: `policy` for generators, `model` for the reward model."""
    return init_args.get("policy") or init_args.get("model")


def _chained_recipes() -> list[Path]:
    return [p for p in RECIPES if (_load(p).get("model") or {}).get("init_args", {}).get("produced_by")]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI compares `args` with sys.argv; under pytest sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["lightning_rlhf"])


def test_recipes_exist():
    # The three stages of the tiny pipeline must be there; more recipes may be added.
    names = set(RECIPE_IDS)
    for needed in ("recipes/sft/tiny_arithmetic.yaml", "recipes/reward_model/tiny_arithmetic.yaml",
                   "recipes/r1_zero/tiny_arithmetic.yaml"):
        assert needed in names


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_print_config_parses_recipe(recipe, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config", "--config", str(recipe)])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = _load(recipe)
    assert printed["model"]["class_path"] == raw["model"]["class_path"]
    assert printed["data"]["class_path"] == raw["data"]["class_path"]
    # Values the recipe sets reach the resolved config unchanged (option groups key by key; the resolved
    # config also lists the defaults the recipe leaves out).
    _assert_given_reached("trainer", raw.get("trainer", {}), printed["trainer"])
    _assert_given_reached("model", raw["model"].get("init_args", {}), printed["model"]["init_args"])


def _assert_given_reached(where: str, given: dict, resolved: dict) -> None:
    for key, value in given.items():
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation, printed resolved
        if isinstance(value, dict) and isinstance(resolved.get(key), dict) and value:
            _assert_given_reached(f"{where}.{key}", value, resolved[key])
        elif isinstance(value, list) and isinstance(resolved.get(key), list) and len(value) == len(resolved[key]) \
                and all(isinstance(v, dict) for v in value):  # e.g. trainer.callbacks: each entry key by key
            for i, (v, r) in enumerate(zip(value, resolved[key])):
                _assert_given_reached(f"{where}.{key}[{i}]", v, r)
        else:
            assert _norm(resolved[key]) == _norm(value), f"{where}.{key}"


@pytest.mark.parametrize("recipe", _chained_recipes(), ids=lambda p: str(p.relative_to(REPO)))
def test_produced_by_names_the_stage_that_writes_the_start_checkpoint(recipe):
    init = _load(recipe)["model"]["init_args"]
    start, producer = _start_checkpoint(init), init["produced_by"]
    assert start, f"{recipe} has produced_by but no policy/model"
    if producer.startswith("python -m lightning_rlhf make-tiny-model"):
        assert start == TINY_BASE_DEFAULT
        return
    if producer.startswith("python -m lightning_rlhf "):  # another command that writes the start directory
        assert f"--out {start}" in producer
        return
    producer_path = REPO / producer
    assert producer_path.is_file(), f"{recipe}: produced_by {producer} does not exist"
    assert _load(producer_path)["model"]["init_args"]["output_dir"] == start


@pytest.mark.parametrize("recipe", _chained_recipes(), ids=lambda p: str(p.relative_to(REPO)))
def test_missing_start_checkpoint_names_path_and_command(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative `checkpoints/...` dirs do not exist here
    init = _load(recipe)["model"]["init_args"]
    start, producer = _start_checkpoint(init), init["produced_by"]
    cmd = producer if producer.startswith("python ") else f"python -m lightning_rlhf fit --config {producer}"
    # The command line prints the user error as one line and exits 2 (no traceback).
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(recipe)])
    assert exc.value.code == 2
    msg = capsys.readouterr().err
    assert f"'{start}'" in msg
    assert f"`{cmd}`" in msg
    assert not (tmp_path / "runs").exists()  # nothing written before the check


def test_missing_start_checkpoint_is_a_file_not_found_error_under_the_wrapping(tmp_path, monkeypatch, capsys):
    # jsonargparse wraps the stage's error in a ValueError; main() finds the MissingFileError in the chain.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes/r1_zero/tiny_arithmetic.yaml")])
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint 'checkpoints/sft-tiny' not found")
    assert "Traceback" not in err


PIPELINE_RUNS = [(p, s) for p in PIPELINES for s in [None, *SETTINGS_FILES]]


@pytest.mark.parametrize("pipeline, extra", PIPELINE_RUNS,
                         ids=[f"{p.relative_to(REPO)}+{s.name if s else ''}" for p, s in PIPELINE_RUNS])
def test_pipeline_stages_parse_with_their_overrides(pipeline, extra, capsys, tmp_path):
    # Every fit stage of a pipeline file, with its overrides and earlier outputs filled in, is a valid
    # `fit` command line (checked with --print_config, run from the repository root like a user would), also
    # with the flags of `precision: bf16-mixed` added, alone and with every settings file of recipes/.
    from lightning_rlhf.pipeline import load_plan, stage_command

    assert SETTINGS_FILES, "recipes/r1/on_gpu.yaml is a settings file"
    stages, settings = load_plan(str(pipeline), *([str(extra)] if extra else []))
    outputs = {st["name"]: str(tmp_path / st["name"]) for st in stages}
    for st in stages:
        if "sample" in st:
            continue
        cmd = stage_command(st, tmp_path, outputs, settings, "bfloat16")
        with pytest.raises(SystemExit) as exc:
            main([cmd[0], "--print_config", *cmd[1:]])
        assert exc.value.code in (0, None), f"stage {st['name']}: {capsys.readouterr().err[-2000:]}"
        capsys.readouterr()


STRATEGIES = sorted((REPO / "configs" / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_every_recipe_composes_with_every_strategy_block(strategy, capsys):
    # One more --config switches any recipe to DDP / FSDP / DeepSpeed: the strategy block's trainer keys win,
    # the recipe's model and data stay as they were.
    block = _load(strategy)["trainer"]
    for recipe in RECIPES:
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--print_config", "--config", str(recipe), "--config", str(strategy)])
        assert exc.value.code in (0, None), recipe
        printed = yaml.safe_load(capsys.readouterr().out)
        for key, value in block.items():
            got = printed["trainer"][key]
            if isinstance(value, dict):  # class_path + init_args: the given init_args reach the resolved ones
                assert got["class_path"] == value["class_path"], (recipe, key)
                _assert_given_reached(f"trainer.{key}", value.get("init_args", {}), got["init_args"])
            else:
                assert _norm(got) == _norm(value), (recipe, key)
        assert printed["model"]["class_path"] == _load(recipe)["model"]["class_path"]
