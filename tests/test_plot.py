"""`plot`: reading sparse CSVLogger files, choosing each panel's series, a PNG of overlaid runs, user errors."""

from __future__ import annotations

import json
import sys

import pytest

from lightning_rlhf.cli import main
from lightning_rlhf.errors import ConfigError
from lightning_rlhf.plot import (
    PANELS, draw, find_runs, panel_series, plot_runs, read_series, run_labels, running_mean, step_seconds,
)

# As Lightning's CSVLogger writes it: a step-0 validation row, then training rows, a validation row at step 2.
RL_CSV = """epoch,perf/rollout_s,perf/update_s,step,train/kl,train/response_length,train/reward,val/accuracy
,,,0,,,,0.25
0,0.5,0.25,0,0.0,30.0,1.0,
0,0.75,0.25,1,0.01,31.0,1.5,
0,1.0,0.5,2,0.02,,2.0,
,,,2,,,,0.5
"""
SFT_CSV = """epoch,step,train/loss,val/accuracy,val/loss
,0,,0.0,3.0
0,4,2.5,,
0,9,1.5,,
,9,,0.4,1.2
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path, csv_text, summary=None):
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text(csv_text)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_read_series_keeps_each_metric_on_the_rows_that_have_it(tmp_path):
    s = read_series(_run(tmp_path / "rl", RL_CSV) / "metrics.csv")
    assert "step" not in s and "epoch" not in s
    assert s["val/accuracy"] == ([0.0, 2.0], [0.25, 0.5])
    assert s["train/reward"] == ([0.0, 1.0, 2.0], [1.0, 1.5, 2.0])
    assert s["train/response_length"] == ([0.0, 1.0], [30.0, 31.0])  # the empty cell at step 2 is skipped


def test_panels_pick_metrics_and_time_per_step(tmp_path):
    panels = panel_series(read_series(_run(tmp_path / "rl", RL_CSV) / "metrics.csv"))
    assert list(panels) == list(PANELS)
    assert panels["KL"] == (([0.0, 1.0, 2.0], [0.0, 0.01, 0.02]), False)
    assert panels["seconds per step"] == (([0.0, 1.0, 2.0], [0.75, 1.0, 1.5]), False)  # rollout + update
    sft = panel_series(read_series(_run(tmp_path / "sft", SFT_CSV) / "metrics.csv"), {"steps": 10, "wall_s": 5.0})
    assert sft["reward"] == (None, False) and sft["KL"] == (None, False)
    assert sft["seconds per step"] == (([0.0, 10.0], [0.5, 0.5]), True)  # the run's mean, from summary.json
    assert panel_series(read_series(tmp_path / "sft" / "metrics.csv"))["seconds per step"] == (None, False)


def test_time_per_step_from_a_wall_clock_column():
    series = {"time": ([0.0, 0.0, 1.0, 3.0], [100.0, 100.5, 102.0, 108.0])}
    assert step_seconds(series, {}) == (([1.0, 3.0], [1.5, 3.0]), False)  # last row of each step, per step


def test_running_mean():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_overlay_of_two_runs_writes_a_png_with_five_panels(tmp_path):
    rl = _run(tmp_path / "a" / "grpo", RL_CSV)
    sft = _run(tmp_path / "b" / "grpo", SFT_CSV, {"steps": 10, "wall_s": 5.0})
    labels = run_labels([rl, sft])
    assert labels == ["a/grpo", "b/grpo"]  # same dir name: a parent tells them apart
    runs = [(label, panel_series(read_series(r / "metrics.csv"), json.loads((r / "summary.json").read_text())
                                 if (r / "summary.json").exists() else {})) for label, r in zip(labels, [rl, sft])]
    drawn = draw(runs, tmp_path / "direct.png")
    assert drawn == {"reward": 1, "KL": 1, "held-out accuracy": 2, "response length": 1, "seconds per step": 2}

    out = plot_runs([rl, sft], tmp_path / "plots" / "cmp.png")
    data = out.read_bytes()
    assert out == tmp_path / "plots" / "cmp.png" and data[:8] == PNG_MAGIC and len(data) > 10_000


def test_long_series_get_a_running_mean_and_empty_panels_say_no_data(tmp_path):
    rows = "".join(f"0,{i},{i % 3}.0\n" for i in range(40))
    run = _run(tmp_path / "long", "epoch,step,train/reward\n" + rows)
    drawn = draw([("long", panel_series(read_series(run / "metrics.csv")))], tmp_path / "long.png")
    assert drawn == {"reward": 1, "KL": 0, "held-out accuracy": 0, "response length": 0, "seconds per step": 0}
    assert (tmp_path / "long.png").read_bytes()[:8] == PNG_MAGIC


def test_pipeline_dir_plots_each_fit_stage(tmp_path):
    pipe = tmp_path / "pipe"
    _run(pipe / "cold_start", SFT_CSV)
    _run(pipe / "grpo", RL_CSV)
    (pipe / "rs").mkdir()  # a sample stage: no metrics.csv
    (pipe / "summary.json").write_text(json.dumps({"stages": [{"name": "cold_start"}, {"name": "rs"}, {"name": "grpo"}]}))
    assert find_runs([pipe]) == [pipe / "cold_start", pipe / "grpo"]
    out = plot_runs([pipe])
    assert out == pipe / "plot.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_command_prints_the_path_and_errors_are_one_line(tmp_path, capsys):
    run = _run(tmp_path / "run", RL_CSV)
    main(["plot", str(run)])
    assert f"plot written to {run / 'plot.png'}" in capsys.readouterr().out
    assert (run / "plot.png").read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "empty").mkdir()
    for bad, why in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "has no metrics.csv")]:
        with pytest.raises(SystemExit) as e:
            main(["plot", str(run), str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(bad) in err and why in err and len(err.strip().splitlines()) == 1


def test_missing_matplotlib_is_a_config_error_naming_the_install(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", RL_CSV)
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.lines"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `from matplotlib.figure import ...` fail
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot_runs([run])
