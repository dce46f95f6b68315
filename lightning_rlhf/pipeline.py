"""`python -m lightning_rlhf pipeline <pipeline.yaml> --output_dir DIR`: stages run in order, outputs by name.

A pipeline file lists stages. A `fit` stage is a recipe plus overrides (any `--key value` of `fit`); a
`sample` stage is rejection sampling (the options of `python -m lightning_rlhf sample`):

    stages:
      - name: cold_start
        recipe: recipes/sft/tiny_arithmetic.yaml
        overrides: {trainer.max_steps: 200}
      - name: rl
        recipe: recipes/r1_zero/tiny_arithmetic.yaml
        overrides: {model.init_args.policy: "@cold_start"}
      - name: rs
        sample: {policy: "@rl", data: {task: arithmetic, n: 500}, rewards: {accuracy: 1.0}, k: 8}
      - name: rs_sft
        recipe: recipes/sft/tiny_arithmetic.yaml
        overrides: {data.init_args.train: {path: "@rs"}}

Besides `stages`, a pipeline file may set, for every stage:

    precision: auto            # or 32-true, bf16-mixed, 16-mixed: fit stages' trainer.precision, the RL
                               # stages' rollout.dtype and the sampler's --dtype; `auto` measures matmuls here
                               # (as `doctor` does) and takes bf16 or fp16 only where >= 1.3x faster than fp32
    fit_overrides: {trainer.accelerator: gpu}   # added to every fit stage
    sample_overrides: {device: cuda}            # added to every sample stage

More files after the pipeline file (`pipeline plan.yaml on_gpu.yaml`) hold only these keys; theirs replace
the plan's. A fit stage's arguments, later winning: the precision flags, the plan's `fit_overrides`, the
stage's `overrides`, the other files' `fit_overrides` (so a file on the command line has the last word);
a sample stage's options likewise: the plan's `sample_overrides`, the stage's, the other files'.

`"@name"` anywhere in a value is the output of an earlier stage: a fit stage's exported model
(`DIR/<name>/model`), a sample stage's JSONL (`DIR/<name>/samples.jsonl`). Each fit stage runs in its own
process with `trainer.default_root_dir DIR/<name>` and `model.init_args.output_dir DIR/<name>/model`.
A stage whose `summary.json` says "finished" (fit) or whose `done.json` exists (sample) is skipped, so a
rerun after a crash continues with the first unfinished stage. `DIR/summary.json` collects every stage's
held-out metrics and wall time (a fit stage's from its own summary, without process start-up), and the
rejection-sampling keep rate; the same is printed as a table.
Simplified: stages run one after another on this machine; a `produced_by` check of a recipe is left to
the stage that reads the output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lightning_rlhf.command_registry import COMMANDS
from lightning_rlhf.errors import ConfigError, MissingFileError


SETTINGS = ("precision", "fit_overrides", "sample_overrides")


def load_plan(path: str, *more: str) -> tuple[list[dict], dict]:
    """(stages, settings) of a pipeline file and the settings files after it, checked: unique stage names,
    one of recipe/sample each, `@` names defined before, only known settings keys."""
    plan = _read(path, "pipeline file")
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: expected a 'stages:' list of {{name, recipe | sample, overrides}}")
    seen: list[str] = []
    for i, st in enumerate(stages):
        name = st.get("name") if isinstance(st, dict) else None
        if not name or name in seen or ("recipe" in st) == ("sample" in st):
            raise ConfigError(f"{path}: stage {i + 1} needs a new 'name' and exactly one of 'recipe' or 'sample', "
                             f"got {st!r}")
        for ref in _refs(st):
            if ref not in seen:
                raise ConfigError(f"{path}: stage '{name}' uses '@{ref}', which is not an earlier stage "
                                 f"(earlier: {', '.join(seen) or 'none'})")
        seen.append(name)
    settings = {k: plan[k] for k in SETTINGS if k in plan}
    settings["late_fit_overrides"], settings["late_sample_overrides"] = {}, {}
    for extra in more:
        add = _read(extra, "pipeline settings file")
        bad = sorted(set(add) - set(SETTINGS))
        if bad:
            raise ConfigError(f"{extra}: unknown keys {bad}; a file after the pipeline file may set only "
                              f"{', '.join(SETTINGS)} (stages come from the first file)")
        settings["late_fit_overrides"].update(add.pop("fit_overrides", None) or {})
        settings["late_sample_overrides"].update(add.pop("sample_overrides", None) or {})
        settings.update(add)
    return stages, settings


def _read(path: str, what: str) -> dict:
    if not Path(path).is_file():
        raise MissingFileError(f"{what} '{path}' does not exist (see recipes/r1/ for examples)")
    plan = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(plan, dict):
        raise ConfigError(f"{path}: expected a YAML mapping, got {type(plan).__name__}")
    return plan


def resolve_precision(settings: dict) -> tuple[str | None, dict[str, float]]:
    """The `precision` setting as a torch dtype name (None: leave the recipes alone), and the matmul GFLOP/s
    measured when it was `auto` (on CUDA when the fit stages ask for a GPU and one is here, else the CPU)."""
    value = settings.get("precision")
    if value is None:
        return None, {}
    from lightning_rlhf.algorithms.runtime import TRAINER_PRECISION, fastest_dtype, matmul_speeds

    by_flag = {flag: dtype for dtype, flag in TRAINER_PRECISION.items()}
    if value != "auto":
        if str(value) not in by_flag:
            raise ConfigError(f"pipeline precision '{value}' is not one of auto, {', '.join(by_flag)}")
        return by_flag[str(value)], {}
    import torch

    overrides = {**(settings.get("fit_overrides") or {}), **(settings.get("late_fit_overrides") or {})}
    wants_gpu = str(overrides.get("trainer.accelerator", "cpu")) in ("gpu", "cuda", "auto")
    speeds = matmul_speeds("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
    return fastest_dtype(speeds), speeds


def _precision_flags(st: dict, dtype: str | None) -> list[str]:
    """The flags that put a stage in `dtype`: trainer.precision (+ rollout.dtype for RL stages), or --dtype."""
    if dtype is None:
        return []
    if "sample" in st:
        return [] if dtype == "float32" else ["--dtype", dtype]
    from lightning_rlhf.algorithms.runtime import TRAINER_PRECISION

    flags = ["--trainer.precision", TRAINER_PRECISION[dtype]]
    sampled = "null" if dtype == "float32" else dtype  # null: sample in the weights' own dtype
    return flags + (["--model.init_args.rollout.dtype", sampled] if _is_rl(st["recipe"]) else [])


def _is_rl(recipe: str) -> bool:
    """Whether a recipe's model samples while it trains (a GRPO or PPO stage: it has rollout options)."""
    import importlib

    from lightning_rlhf.algorithms.rl_stage import RLStage

    path = ((yaml.safe_load(Path(recipe).read_text()) or {}).get("model") or {}).get("class_path", "")
    module, _, name = path.rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module), name), RLStage)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _refs(value: Any) -> list[str]:
    if isinstance(value, str) and value.startswith("@"):
        return [value[1:]]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _resolve(value: Any, outputs: dict[str, str]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        return outputs[value[1:]]
    if isinstance(value, dict):
        return {k: _resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, outputs) for v in value]
    return value


def _flag_value(v: Any) -> str:
    """A YAML value as one command-line argument: 4, null, true, {path: x}."""
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, (bool, int, float)):
        return json.dumps(v)
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()


def stage_command(st: dict, out: Path, outputs: dict[str, str], settings: dict | None = None,
                  dtype: str | None = None) -> list[str]:
    """The `python -m lightning_rlhf ...` argv of a stage, `@` names resolved, the plan's settings applied
    (`dtype`: the resolved `precision`, see `resolve_precision`)."""
    root, settings = out / st["name"], settings or {}
    if "sample" in st:
        opts = {**(settings.get("sample_overrides") or {}), **_resolve(st["sample"], outputs),
                **(settings.get("late_sample_overrides") or {}), "out": str(root / "samples.jsonl")}
        flags = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", _flag_value(v))]
        return ["sample", *_precision_flags(st, dtype), *flags]
    args = ["fit", "--config", st["recipe"], "--trainer.default_root_dir", str(root),
            "--model.init_args.output_dir", str(root / "model"), *_precision_flags(st, dtype)]
    layers = (settings.get("fit_overrides"), st.get("overrides"), settings.get("late_fit_overrides"))
    for layer in layers:
        for k, v in _resolve(layer or {}, outputs).items():
            args += [f"--{k}", _flag_value(v)]
    return args


def _output(st: dict, out: Path) -> str:
    return str(out / st["name"] / ("samples.jsonl" if "sample" in st else "model"))


def _finished(st: dict, out: Path) -> dict | None:
    """The stage's record when it finished earlier, else None."""
    root = out / st["name"]
    marker = root / ("done.json" if "sample" in st else "summary.json")
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    return record if "sample" in st or record.get("status") == "finished" else None


def run_pipeline(plan_path: str, out: Path, print_plan: bool = False, more: tuple[str, ...] = ()) -> dict:
    """Run (or with `print_plan`, only list) the stages; returns the summary written to `out/summary.json`."""
    (stages, settings), outputs = load_plan(plan_path, *more), {}
    dtype, speeds = resolve_precision(settings)
    summary: dict[str, Any] = {"pipeline": plan_path, "stages": []}
    if dtype is not None:
        summary["precision"] = {"setting": settings["precision"], "dtype": dtype, "matmul_gflops": speeds}
        print(f"[lightning_rlhf] pipeline precision {settings['precision']}: {dtype}"
              + (" (" + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items()) + " GFLOP/s)" if speeds else ""))
    if not print_plan:
        out.mkdir(parents=True, exist_ok=True)
    for st in stages:
        cmd = stage_command(st, out, outputs, settings, dtype)
        outputs[st["name"]] = _output(st, out)
        if print_plan:
            print(f"{st['name']:<16} python -m lightning_rlhf {' '.join(cmd)}")
            continue
        summary["stages"].append(_stage_row(st, _run_stage(st, cmd, out)))
        if "sample" in st:
            summary["rejection_sampling"] = _sampling_figures(out / st["name"] / "samples.jsonl")
    if not print_plan:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_table(summary)
    return summary


def _run_stage(st: dict, cmd: list[str], out: Path) -> dict:
    """Run one stage in its own process unless it finished earlier; its record (summary or done.json)."""
    record = _finished(st, out)
    if record is not None:
        print(f"[lightning_rlhf] pipeline stage '{st['name']}': finished earlier, skipped", flush=True)
        return record
    print(f"[lightning_rlhf] pipeline stage '{st['name']}': python -m lightning_rlhf {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lightning_rlhf", *cmd], check=True)
    if "sample" in st:
        (out / st["name"] / "done.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    return _finished(st, out) or {"wall_s": time.perf_counter() - t0}


def _stage_row(st: dict, record: dict) -> dict:
    """One summary row: the stage's name, recipe, wall time (the fit's own, from its summary) and val/ metrics."""
    row = {"name": st["name"], "recipe": st.get("recipe", "sample"), "wall_s": record.get("wall_s")}
    row.update({k: v for k, v in (record.get("val_after") or {}).items() if k.startswith("val/")})
    return row


def _sampling_figures(path: Path) -> dict:
    from lightning_rlhf.algorithms.rejection_sampling import sampled_count

    progress = [json.loads(line) for line in Path(f"{path}.progress").read_text().splitlines() if line.strip()]
    prompts, kept = sum(p["prompts"] for p in progress), sum(p["kept"] for p in progress)
    k = json.loads(path.read_text().splitlines()[0])["sampling"]["k"] if kept else None
    sampled = sum(sampled_count(p, k) for p in progress) if k else None
    return {"prompts": prompts, "sampled": sampled, "kept": kept, "keep_rate": kept / sampled if sampled else 0.0}


def print_table(summary: dict) -> None:
    keys = sorted({k for row in summary["stages"] for k in row if k.startswith("val/")})
    print(f"\n{'stage':<20}{'wall s':>9}" + "".join(f"{k:>22}" for k in keys))
    for row in summary["stages"]:
        cells = "".join(f"{row[k]:>22.3f}" if k in row else f"{'-':>22}" for k in keys)
        print(f"{row['name']:<20}{row['wall_s'] or 0:>9.1f}{cells}")
    if "rejection_sampling" in summary:
        rs = summary["rejection_sampling"]
        print(f"rejection sampling: kept {rs['kept']} of {rs['sampled']} samples ({rs['prompts']} prompts), "
              f"keep rate {rs['keep_rate']:.3f}")


@COMMANDS.register("pipeline")
def pipeline(argv: list[str]) -> dict:
    """Run a multi-stage pipeline file (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m lightning_rlhf pipeline", description=pipeline.__doc__)
    p.add_argument("plan", help="pipeline YAML with a 'stages:' list")
    p.add_argument("settings", nargs="*", help="more YAML files with precision / fit_overrides / sample_overrides")
    p.add_argument("--output_dir", required=True, help="every stage writes under DIR/<stage name>")
    p.add_argument("--print_plan", action="store_true", help="show the resolved stage commands, run nothing")
    a = p.parse_args(argv)
    return run_pipeline(a.plan, Path(a.output_dir), a.print_plan, tuple(a.settings))
