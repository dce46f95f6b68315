"""`python -m lightning_rlhf plot RUN_DIR [RUN_DIR ...]`: one PNG with the curves that say how runs went.

Five panels over steps: reward (train/reward), KL to the reference (train/kl), held-out accuracy
(val/accuracy), response length (train/response_length) and seconds per step (perf/rollout_s +
perf/update_s; without them the differences of a wall-clock column, if the CSV has one; else the run's mean,
summary.json's wall_s / steps, as a dashed flat line). Several runs overlay, one colour each, labelled by
directory name (with as many parent directories as it takes to tell two runs apart).

A run dir is a fit run's `trainer.default_root_dir`: it holds `metrics.csv`, written by Lightning's CSVLogger,
one row per logging call with each metric filled on only some rows. A pipeline output dir (a `summary.json`
with "stages") stands for its fit stages: each stage is its own line (labelled like any run dir), on its own
steps from 0 (stages are not concatenated: an SFT stage's 1200 steps would squeeze a GRPO stage's 200 into a
corner); stages without a metrics.csv (rejection sampling) are left out.

`read_series`, `find_runs`, `run_labels` and `panel_series` are pure functions; `draw` draws them on
matplotlib's Agg canvas (no pyplot, so no global backend is changed). A panel without data says "no data".
A series of 30 points or more is drawn faint, under its running mean over 5% of its points, so trends show
through the step-to-step noise of RL metrics. Simplification: empty, non-numeric and non-finite cells are skipped.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_rlhf.errors import ConfigError

Series = tuple[list[float], list[float]]  # (steps, values), in file order
PANELS = ("reward", "KL", "held-out accuracy", "response length", "seconds per step")
PANEL_KEYS = {"reward": "train/reward", "KL": "train/kl", "held-out accuracy": "val/accuracy",
              "response length": "train/response_length"}
SMOOTH_MIN_POINTS, SMOOTH_SHARE = 30, 0.05  # series this long also get a running mean over 5% of their points
CLOCK_COLUMNS = ("time", "timestamp", "wall_s", "_timestamp", "_runtime")  # seconds since some origin


def read_series(path: str | Path) -> dict[str, Series]:
    """Every column of a CSVLogger `metrics.csv` but step/epoch, as (steps, values) over the rows that have it."""
    out: dict[str, Series] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            if step is None:
                continue
            for key, cell in row.items():
                value = _number(cell)
                if key in ("step", "epoch") or key is None or value is None:
                    continue
                steps, values = out.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return out


def _number(cell: Any) -> float | None:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def step_seconds(series: dict[str, Series], summary: dict[str, Any]) -> tuple[Series | None, bool]:
    """(seconds per step, is_mean): rollout + update time per step; else wall-clock differences; else the
    run's mean from its summary (is_mean True, a flat line over the run's steps); (None, False) if none."""
    if "perf/rollout_s" in series and "perf/update_s" in series:
        update = dict(zip(*series["perf/update_s"]))
        steps, values = series["perf/rollout_s"]
        both = [(s, v + update[s]) for s, v in zip(steps, values) if s in update]
        return ([s for s, _ in both], [v for _, v in both]), False
    for key in CLOCK_COLUMNS:
        if key in series and len(series[key][0]) > 1:
            (steps, clock), last = series[key], {}
            for s, t in zip(steps, clock):
                last[s] = t  # the last row of each step
            order = sorted(last)
            pairs = [(b, (last[b] - last[a]) / (b - a)) for a, b in zip(order, order[1:]) if b > a]
            return ([s for s, _ in pairs], [v for _, v in pairs]), False
    steps, wall = summary.get("steps"), summary.get("wall_s")
    if isinstance(steps, (int, float)) and isinstance(wall, (int, float)) and steps > 0:
        return ([0.0, float(steps)], [wall / steps] * 2), True
    return None, False


def panel_series(series: dict[str, Series], summary: dict[str, Any] | None = None) -> dict[str, tuple[Series | None, bool]]:
    """Panel title -> (its series or None, drawn as a run mean). Values of one run, in `PANELS` order."""
    panels: dict[str, tuple[Series | None, bool]] = {p: (series.get(k), False) for p, k in PANEL_KEYS.items()}
    panels["seconds per step"] = step_seconds(series, summary or {})
    return {p: panels[p] for p in PANELS}


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run dirs to plot: each path that holds metrics.csv, and each fit stage of a pipeline output dir."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.csv").is_file():
            runs.append(path)
            continue
        summary = _read_json(path / "summary.json")
        stages = [path / str(s.get("name")) for s in summary.get("stages", []) if isinstance(s, dict)]
        stages = [s for s in stages if (s / "metrics.csv").is_file()]
        if not stages:
            what = "does not exist" if not path.exists() else "has no metrics.csv (and is no pipeline output dir)"
            raise ConfigError(f"run dir '{path}' {what}: pass a fit run's trainer.default_root_dir, which holds "
                              "metrics.csv, or a pipeline's --output_dir")
        runs += stages
    return runs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Each run's directory name, with as many parents as it takes for the labels to differ."""
    parts = [Path(r).resolve().parts for r in runs]
    for depth in range(1, max(map(len, parts), default=1) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the `window` - 1 before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw(runs: Sequence[tuple[str, dict[str, tuple[Series | None, bool]]]], out: str | Path) -> dict[str, int]:
    """Draw the panels of `runs` ((label, panel_series(...)) each) into the PNG `out`; panel -> runs drawn."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    drawn = {panel: _draw_panel(ax, panel, runs) for ax, panel in zip(axes, PANELS)}
    axes[-1].axis("off")
    handles = [Line2D([], [], color=f"C{i % 10}", label=label) for i, (label, _) in enumerate(runs)]
    axes[-1].legend(handles=handles, loc="center", fontsize=10,
                    title=f"run\n(long curves: faint per step,\nsolid the mean of {SMOOTH_SHARE:.0%} of the steps)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return drawn


def _draw_panel(ax: Any, panel: str, runs: Sequence[tuple[str, dict[str, tuple[Series | None, bool]]]]) -> int:
    """One panel: each run that has its series, as a line (points marked where sparse; a faint line and its
    running mean where long); returns how many runs it drew."""
    drawn, dashed = 0, False
    for i, (label, panels) in enumerate(runs):
        series, is_mean = panels[panel]
        if series is None or not series[0]:
            continue
        steps, values = series
        style = {"color": f"C{i % 10}", "label": label, "linestyle": "--" if is_mean else "-"}
        if panel == "held-out accuracy":
            ax.plot(steps, values, marker="o", markersize=4, linewidth=1.5, **style)
        elif len(values) >= SMOOTH_MIN_POINTS and not is_mean:
            ax.plot(steps, values, linewidth=0.6, alpha=0.3, color=style["color"])
            ax.plot(steps, running_mean(values, max(2, round(len(values) * SMOOTH_SHARE))), linewidth=1.5, **style)
        else:
            ax.plot(steps, values, linewidth=1.2, **style)
        drawn, dashed = drawn + 1, dashed or is_mean
    ax.set_title(panel + (" (dashed: the run's mean)" if dashed else ""), fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    return drawn


def plot_runs(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Read the runs of `paths` and draw them into `out` (default `<first path>/plot.png`); returns `out`."""
    runs = find_runs(paths)
    out = Path(out) if out is not None else Path(paths[0]) / "plot.png"
    data = [(label, panel_series(read_series(run / "metrics.csv"), _read_json(run / "summary.json")))
            for label, run in zip(run_labels(runs), runs)]
    draw(data, out)
    return out
