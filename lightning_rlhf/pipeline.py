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


def load_plan(path: str) -> list[dict]:
    """The stages of a pipeline file, checked: unique names, one of recipe/sample, `@` names defined before."""
    if not Path(path).is_file():
        raise MissingFileError(f"pipeline file '{path}' does not exist (see recipes/r1/ for examples)")
    stages = (yaml.safe_load(Path(path).read_text()) or {}).get("stages")
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
    return stages


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


def stage_command(st: dict, out: Path, outputs: dict[str, str]) -> list[str]:
    """The `python -m lightning_rlhf ...` argv of a stage, `@` names resolved."""
    root = out / st["name"]
    if "sample" in st:
        opts = {**_resolve(st["sample"], outputs), "out": str(root / "samples.jsonl")}
        return ["sample", *[a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", _flag_value(v))]]
    args = ["fit", "--config", st["recipe"], "--trainer.default_root_dir", str(root),
            "--model.init_args.output_dir", str(root / "model")]
    for k, v in _resolve(st.get("overrides") or {}, outputs).items():
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


def run_pipeline(plan_path: str, out: Path, print_plan: bool = False) -> dict:
    """Run (or with `print_plan`, only list) the stages; returns the summary written to `out/summary.json`."""
    stages, outputs = load_plan(plan_path), {}
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"pipeline": plan_path, "stages": []}
    for st in stages:
        cmd = stage_command(st, out, outputs)
        outputs[st["name"]] = _output(st, out)
        if print_plan:
            print(f"{st['name']:<16} python -m lightning_rlhf {' '.join(cmd)}")
            continue
        record = _finished(st, out)
        if record is None:
            print(f"[lightning_rlhf] pipeline stage '{st['name']}': python -m lightning_rlhf {' '.join(cmd)}",
                  flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lightning_rlhf", *cmd], check=True)
            if "sample" in st:
                (out / st["name"] / "done.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
            record = _finished(st, out) or {"wall_s": time.perf_counter() - t0}
        else:
            print(f"[lightning_rlhf] pipeline stage '{st['name']}': finished earlier, skipped", flush=True)
        summary["stages"].append(_stage_row(st, record))
        if "sample" in st:
            summary["rejection_sampling"] = _sampling_figures(out / st["name"] / "samples.jsonl")
    if not print_plan:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_table(summary)
    return summary


def _stage_row(st: dict, record: dict) -> dict:
    """One summary row: the stage's name, recipe, wall time (the fit's own, from its summary) and val/ metrics."""
    row = {"name": st["name"], "recipe": st.get("recipe", "sample"), "wall_s": record.get("wall_s")}
    row.update({k: v for k, v in (record.get("val_after") or {}).items() if k.startswith("val/")})
    return row


def _sampling_figures(path: Path) -> dict:
    progress = [json.loads(line) for line in Path(f"{path}.progress").read_text().splitlines() if line.strip()]
    prompts, kept = sum(p["prompts"] for p in progress), sum(p["kept"] for p in progress)
    k = json.loads(path.read_text().splitlines()[0])["sampling"]["k"] if kept else None
    sampled = prompts * k if k else None
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
    p.add_argument("--output_dir", required=True, help="every stage writes under DIR/<stage name>")
    p.add_argument("--print_plan", action="store_true", help="show the resolved stage commands, run nothing")
    a = p.parse_args(argv)
    return run_pipeline(a.plan, Path(a.output_dir), a.print_plan)
