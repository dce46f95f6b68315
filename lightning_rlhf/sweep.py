"""`python -m lightning_rlhf sweep <file> --count N --parallel P --out DIR`: a hyperparameter sweep on this machine.

It reads the file `wandb sweep` reads (`method`, `metric: {name, goal}`, `parameters` named by their CLI path,
`command` with wandb's `${...}` macros) and needs no wandb account. Each trial is one run of the command, in
its own process, with the trial's parameters as `--key=value` flags in place of `${args}` plus
`--trainer.default_root_dir=DIR/trial_<k>` (and the logger's `save_dir`, and `--model.init_args.output_dir=
DIR/trial_<k>/model` unless the command or a parameter sets it). Its output goes to `DIR/trial_<k>/log.txt`;
its score is the metric in the run's `summary.json` (final validation), else the last value in its
`metrics.csv`. A trial that exits non-zero or has no metric is recorded as failed, with its exit status and
the end of its log. Each finished trial is appended (flushed and fsynced) to `DIR/trials.jsonl`; a rerun
skips the trials recorded there and reruns, in a cleaned directory, one that was running when killed. At the
end a leaderboard (best first, failed trials last) is printed and written to `DIR/leaderboard.{json,md}`.

Simplifications: only `grid` (cartesian product in file order, last parameter fastest) and `random` (seeded
by the file's top-level `seed`, default 0, drawn in trial order, so a larger `--count` extends a sweep) run
locally; `bayes` needs wandb's server, and so do `early_terminate` and nested `parameters`. `${env}` is
dropped. A rerun checks each recorded trial's parameters, not the command.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from lightning_rlhf.errors import ConfigError

METHODS = ("grid", "random")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb's default
ARGS_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}", "${args_json_file}")
MACROS = ("${env}", "${interpreter}", "${program}", *ARGS_MACROS)


def _log_uniform(r: random.Random, lo: float, hi: float) -> float:
    return math.exp(r.uniform(math.log(lo), math.log(hi)))


def _q(x: float, q: float) -> float:
    return round(x / q) * q


def _categorical(r: random.Random, p: dict) -> Any:
    return r.choices(p["values"], weights=p.get("probabilities"))[0]


# name -> (keys it needs, sampler(rng, spec)); the formulas of wandb's sweep configuration docs.
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], Callable[[random.Random, dict], Any]]] = {
    "constant": (("value",), lambda r, p: p["value"]),
    "categorical": (("values",), _categorical),
    "categorical_w_probabilities": (("values", "probabilities"), _categorical),
    "int_uniform": (("min", "max"), lambda r, p: r.randint(int(p["min"]), int(p["max"]))),
    "uniform": (("min", "max"), lambda r, p: r.uniform(p["min"], p["max"])),
    "q_uniform": (("min", "max"), lambda r, p: _q(r.uniform(p["min"], p["max"]), p.get("q", 1.0))),
    "log_uniform": (("min", "max"), lambda r, p: math.exp(r.uniform(p["min"], p["max"]))),  # min/max: ln(value)
    "log_uniform_values": (("min", "max"), lambda r, p: _log_uniform(r, p["min"], p["max"])),
    "q_log_uniform_values": (("min", "max"), lambda r, p: _q(_log_uniform(r, p["min"], p["max"]), p.get("q", 1.0))),
    "normal": ((), lambda r, p: r.gauss(p.get("mu", 0.0), p.get("sigma", 1.0))),
    "log_normal": ((), lambda r, p: math.exp(r.gauss(p.get("mu", 0.0), p.get("sigma", 1.0)))),
}


def _kind(path: str, name: str, spec: Any) -> str:
    """The distribution of one parameter (wandb's inference when none is named), its keys checked."""
    where = f"{path}: parameter '{name}'"
    if not isinstance(spec, dict) or "parameters" in spec:
        raise ConfigError(f"{where} must be a mapping with `values`, `value` or `distribution` (nested parameters "
                          f"are not supported: name each by its full CLI path), got {spec!r}")
    kind = spec.get("distribution")
    if kind is None:
        if "values" in spec:
            kind = "categorical"
        elif "value" in spec:
            kind = "constant"
        elif "min" in spec and "max" in spec:
            kind = "int_uniform" if all(isinstance(spec[k], int) for k in ("min", "max")) else "uniform"
        else:
            raise ConfigError(f"{where} has no `values`, `value` or `distribution`; give it e.g. `values: [1, 2]` "
                              "or `distribution: uniform` with `min` and `max`")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution '{kind}'. Valid names: {', '.join(DISTRIBUTIONS)}")
    missing = [k for k in DISTRIBUTIONS[kind][0] if k not in spec]
    if missing:
        raise ConfigError(f"{where}: distribution '{kind}' needs {' and '.join(f'`{k}`' for k in missing)}")
    if kind.startswith("categorical") and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"{where}: `values` must be a non-empty list, got {spec['values']!r}")
    bad = [k for k in ("min", "max", "q", "mu", "sigma") if k in spec
           and (isinstance(spec[k], bool) or not isinstance(spec[k], (int, float)))]
    if bad:  # YAML 1.1 reads 1e-4 (no dot) as a string
        raise ConfigError(f"{where}: `{bad[0]}` must be a number, got {spec[bad[0]]!r} (write 1e-4 as 1.0e-4)")
    positive = kind in ("log_uniform_values", "q_log_uniform_values")
    if "min" in spec and "max" in spec and (spec["min"] > spec["max"] or (positive and spec["min"] <= 0)):
        raise ConfigError(f"{where}: needs min <= max" + (" and min > 0" if positive else "")
                          + f", got min {spec['min']}, max {spec['max']}")
    return kind


def _read(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"sweep file '{path}' does not exist (see sweeps/ for examples)")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping with method, metric, parameters, command")
    return raw


def load_sweep(path: str, method: str | None = None) -> dict:
    """The sweep file, checked: {name, method, metric, goal, parameters, kinds, command, program, seed, run_cap}.
    `method` overrides the file's (e.g. `random` for a `bayes` file)."""
    raw = _read(path)
    method = method or raw.get("method")
    if method == "bayes":
        raise ConfigError(f"{path}: method 'bayes' needs wandb's server; local sweeps support grid and random: set "
                          "`method: random` in the file or pass --method random (with --count N)")
    if method not in METHODS:
        raise ConfigError(f"{path}: unknown method {method!r}; local sweeps support {' and '.join(METHODS)}")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not metric.get("name"):
        raise ConfigError(f"{path}: needs `metric: {{name: val/accuracy, goal: maximize}}` to rank the trials")
    goal = metric.get("goal", "minimize")  # wandb's default
    if goal not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: metric goal must be maximize or minimize, got {goal!r}")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: needs `parameters:`, a mapping from CLI path to `values`/`value`/`distribution`")
    kinds = {str(name): _kind(path, name, spec) for name, spec in params.items()}
    continuous = [n for n, k in kinds.items() if k != "constant" and not k.startswith("categorical")]
    if method == "grid" and continuous:
        raise ConfigError(f"{path}: grid search cannot enumerate {', '.join(continuous)} (a distribution); give "
                          "them `values: [...]` or use `method: random`")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"{path}: `seed` must be an integer, got {seed!r}")
    return {"path": path, "name": str(raw.get("name") or Path(path).stem), "method": method, "metric": metric["name"],
            "goal": goal, "parameters": {str(k): v for k, v in params.items()}, "kinds": kinds, "seed": seed,
            "command": _command(path, raw), "program": raw.get("program"), "run_cap": raw.get("run_cap")}


def _command(path: str, raw: dict) -> list[str]:
    command = raw.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not command:
        raise ConfigError(f"{path}: `command` must be a list of arguments, e.g. [${{interpreter}}, -m, lightning_rlhf, "
                          "fit, --config, <recipe>, ${args}]")
    command = [str(c) for c in command]
    unknown = [c for c in command if c.startswith("${") and c not in MACROS]
    if unknown:
        raise ConfigError(f"{path}: unknown macro {unknown[0]} in `command`; known: {', '.join(MACROS)}")
    if not any(c in ARGS_MACROS for c in command):
        raise ConfigError(f"{path}: `command` has no ${{args}}, so trials would not get their parameters; add it")
    if "${program}" in command and not raw.get("program"):
        raise ConfigError(f"{path}: `command` uses ${{program}} but the file has no `program:`")
    first = next((c for c in command if c != "${env}"), "")
    if not first.startswith("${") and shutil.which(first) is None:
        raise ConfigError(f"{path}: `command` starts with '{first}', which is not a program here; start it with "
                          "${interpreter} (this Python)")
    return command


def expand_trials(sweep: dict, count: int | None = None) -> list[dict]:
    """The parameters of each trial, in order: the grid's product (capped at `count`), or `count` seeded draws."""
    if count is not None and count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    count = count or sweep.get("run_cap")
    params, kinds = sweep["parameters"], sweep["kinds"]
    if sweep["method"] == "grid":
        axes = [[params[n]["value"]] if k == "constant" else list(params[n]["values"]) for n, k in kinds.items()]
        return [dict(zip(kinds, combo)) for combo in itertools.islice(itertools.product(*axes), count)]
    if not count:
        raise ConfigError(f"{sweep['path']}: random search has no end; pass --count N (or set `run_cap:` in the file)")
    rng = random.Random(sweep["seed"])
    return [{n: DISTRIBUTIONS[k][1](rng, params[n]) for n, k in kinds.items()} for _ in range(count)]


def _flag_value(v: Any) -> str:
    """A YAML value as one command-line argument: 4, 5e-05, null, true, {task: arithmetic, n: 100}."""
    if isinstance(v, str):
        return v
    if v is None or isinstance(v, (bool, int, float)):
        return json.dumps(v)
    return yaml.safe_dump(v, default_flow_style=True, width=10**6, sort_keys=False).strip()


def trial_argv(sweep: dict, params: dict, trial_dir: Path) -> list[str]:
    """The trial's command: macros expanded, its parameters plus its directories in place of `${args}`."""
    args = dict(params)
    text = " ".join(sweep["command"])
    args["trainer.default_root_dir"] = str(trial_dir)
    if "trainer.logger.init_args.save_dir" in text:
        args["trainer.logger.init_args.save_dir"] = str(trial_dir)
    if "model.init_args.output_dir" not in text and "model.init_args.output_dir" not in params:
        args["model.init_args.output_dir"] = str(trial_dir / "model")
    argv: list[str] = []
    for item in sweep["command"]:
        if item == "${interpreter}":
            argv.append(sys.executable)
        elif item == "${program}":
            argv.append(str(sweep["program"]))
        elif item == "${args}":
            argv += [f"--{k}={_flag_value(v)}" for k, v in args.items()]
        elif item == "${args_no_hyphens}":
            argv += [f"{k}={_flag_value(v)}" for k, v in args.items()]
        elif item == "${args_no_boolean_flags}":
            argv += [f"--{k}" if v is True else f"--{k}={_flag_value(v)}" for k, v in args.items() if v is not False]
        elif item == "${args_json}":
            argv.append(json.dumps(args))
        elif item == "${args_json_file}":
            (trial_dir / "params.json").write_text(json.dumps(args))
            argv.append(str(trial_dir / "params.json"))
        elif item != "${env}":
            argv.append(item)
    return argv


def read_metric(trial_dir: Path, metric: str) -> float | None:
    """The metric's final value: summary.json (val_after, then train_last), else the last one in metrics.csv."""
    try:
        summary = json.loads((trial_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    values = [(summary.get(part) or {}).get(metric) for part in ("val_after", "train_last")]
    if not any(isinstance(v, (int, float)) for v in values) and (trial_dir / "metrics.csv").is_file():
        with open(trial_dir / "metrics.csv", newline="") as f:
            values = [row.get(metric) for row in csv.DictReader(f)][::-1]
    for v in values:
        try:
            if v not in (None, "") and not math.isnan(float(v)):
                return float(v)
        except (TypeError, ValueError):
            continue
    return None


def leaderboard(rows: list[dict], goal: str) -> list[dict]:
    """Finished trials best first (ties: lower index first), then failed ones by index; each with its rank."""
    sign = -1.0 if goal == "maximize" else 1.0
    ok = sorted((r for r in rows if r["status"] == "finished"), key=lambda r: (sign * r["metric"], r["index"]))
    failed = sorted((r for r in rows if r["status"] != "finished"), key=lambda r: r["index"])
    return [{"rank": i, **r} for i, r in enumerate(ok + failed, 1)]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each CLI path's shortest dotted suffix that no other key ends with (`...optimizer.init_args.lr` -> `lr`)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if n == len(parts) or sum(o == tail or o.endswith("." + tail) for o in keys) == 1:
                out[key] = tail
                break
    return out


def leaderboard_markdown(board: list[dict], metric: str) -> str:
    keys = list(dict.fromkeys(k for r in board for k in r["params"]))
    names = short_names(keys)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else _flag_value(v)  # noqa: E731
    lines = ["| rank | trial | " + " | ".join([metric, *names.values()]) + " | wall s | status |",
             "|---:|---:|---:|" + "---|" * len(keys) + "---:|---|"]
    for r in board:
        score = f"{r['metric']:.4f}" if r["status"] == "finished" else "-"
        status = r["status"] if r["status"] == "finished" else f"failed ({r.get('reason', '?')})"
        cells = [fmt(r["params"][k]) if k in r["params"] else "-" for k in keys]
        row = [str(r["rank"]), str(r["index"]), score, *cells, f"{r['wall_s']:.1f}", status]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def load_state(path: Path) -> dict[int, dict]:
    """Recorded trials by index (the last row of an index wins); a line torn by a kill is cut off the file."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        os.truncate(path, len(data))
    rows: dict[int, dict] = {}
    for n, line in enumerate(data.decode().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
            rows.update({row["index"]: row} if row else {})
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{n} is not a trial row ({line[:80]!r}); delete that line and rerun") from None
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _start(sweep: dict, k: int, params: dict, out: Path, env: dict, resume: bool = False) -> tuple:
    """Start trial k in its `trial_<k>` dir, its output to log.txt; (process, log, t0, dir). With `resume` and a
    checkpoint there (a trial killed with the sweep), it continues from it; otherwise the dir is cleaned first."""
    from lightning_rlhf.callbacks.checkpoint import step_checkpoints

    d = out / f"trial_{k}"
    argv = trial_argv(sweep, params, d)
    if resume and step_checkpoints(d / "checkpoints"):
        argv += ["--ckpt_path", "last"]
    else:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    log = open(d / "log.txt", "a")
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    print(f"[lightning_rlhf] sweep trial {k}: {json.dumps(params)} -> {d}", flush=True)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.perf_counter(), d


def _finish(sweep: dict, k: int, params: dict, started: tuple) -> dict:
    proc, log, t0, d = started
    log.close()
    rc = proc.returncode
    metric = read_metric(d, sweep["metric"]) if rc == 0 else None
    row = {"index": k, "params": params, "status": "finished" if metric is not None else "failed",
           "metric": metric, "wall_s": round(time.perf_counter() - t0, 1), "dir": str(d)}
    if metric is None:
        row["returncode"] = rc
        row["reason"] = f"no {sweep['metric']} in summary.json or metrics.csv" if rc == 0 else f"exit status {rc}"
        row["log_tail"] = _tail(d / "log.txt")
    print(f"[lightning_rlhf] sweep trial {k}: " + (f"{sweep['metric']} = {metric:.4f}" if metric is not None
                                                   else f"failed ({row['reason']}), see {d / 'log.txt'}")
          + f" ({row['wall_s']:.0f} s)", flush=True)
    return row


def _run_trials(sweep: dict, todo: list[tuple[int, dict, bool]], out: Path, parallel: int) -> None:
    """Run the (index, params, resume) trials, up to `parallel` at once, appending each one's row to trials.jsonl
    as it ends."""
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    todo, running = list(todo), {}
    try:
        while todo or running:
            while todo and len(running) < parallel:
                k, params, resume = todo.pop(0)
                running[k] = (params, _start(sweep, k, params, out, env, resume))
            for k, (params, started) in list(running.items()):
                if started[0].poll() is not None:
                    _append(out / "trials.jsonl", _finish(sweep, k, params, started))
                    del running[k]
            time.sleep(0.05)
    finally:
        for _, started in running.values():  # stopped early (Ctrl-C): leave no trial behind
            started[0].kill()


def run_sweep(path: str, count: int | None = None, parallel: int = 1, out: str | None = None,
              method: str | None = None, retry_failed: bool = False) -> list[dict]:
    """Run the sweep's unfinished trials, then print and save the leaderboard; returns its rows."""
    sweep = load_sweep(path, method)
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    trials = [json.loads(json.dumps(p)) for p in expand_trials(sweep, count)]  # as recorded in trials.jsonl
    root = Path(out or Path("runs/sweeps") / sweep["name"])
    root.mkdir(parents=True, exist_ok=True)
    done = load_state(root / "trials.jsonl")
    for k, params in enumerate(trials, 1):
        if k in done and done[k]["params"] != params:
            raise ConfigError(f"{root}/trials.jsonl: trial {k} ran with {done[k]['params']}, but {path} now gives "
                              f"{params} (the sweep file changed); pass another --out DIR, or delete {root} to start "
                              "over")
    todo = [(k, p, k not in done) for k, p in enumerate(trials, 1)  # not recorded: killed, continue it
            if k not in done or (retry_failed and done[k]["status"] != "finished")]
    print(f"[lightning_rlhf] sweep {sweep['name']} ({sweep['method']}): {len(trials)} trials, "
          f"{len(trials) - len(todo)} finished earlier, {parallel} at a time -> {root}", flush=True)
    _run_trials(sweep, todo, root, parallel)
    board = leaderboard(list(load_state(root / "trials.jsonl").values()), sweep["goal"])
    table = leaderboard_markdown(board, sweep["metric"])
    (root / "leaderboard.json").write_text(json.dumps({"sweep": path, "metric": sweep["metric"], "goal": sweep["goal"],
                                                       "trials": board}, indent=2))
    (root / "leaderboard.md").write_text(f"# Sweep {sweep['name']}: {sweep['metric']} ({sweep['goal']})\n\n{table}")
    print(f"\n{sweep['metric']} ({sweep['goal']}), best first:\n{table}\n{root / 'leaderboard.md'}", flush=True)
    return board
