"""Local sweeps: the file is read as wandb reads it, trials expand in a fixed order, the leaderboard ranks failed
trials last, and a sweep run for real (with a fake, instant trial program: this file run as a script) skips its
finished trials on a rerun, also after being killed mid-trial.

Run as a script, this file is the fake trial: it takes `--key=value` flags, appends its `x` to the `counter`
file, and writes its score `10 * x` into its `--trainer.default_root_dir` (summary.json, or only metrics.csv when
x is 2); x = -1 fails with exit status 3, and with FAKE_SLEEP set, trials other than x = 1 sleep that long first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.sweep import (expand_trials, leaderboard, leaderboard_markdown, load_state, load_sweep, run_sweep,
                                  trial_argv)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    """Trials run this file as a script, which imports the package from this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def fake_trial(argv: list[str]) -> int:
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    root, x = Path(args["trainer.default_root_dir"]), int(args["x"])
    with open(args["counter"], "a") as f:
        f.write(f"{x}\n")
    if x != 1 and os.environ.get("FAKE_SLEEP"):
        time.sleep(float(os.environ["FAKE_SLEEP"]))
    if x == -1:
        print("boom: x must be positive")
        return 3
    root.mkdir(parents=True, exist_ok=True)
    if x == 2:  # no summary: the score is the last value in metrics.csv
        (root / "metrics.csv").write_text(f"step,val/score,train/loss\n0,1.0,\n5,,0.5\n9,{10 * x},\n")
    else:
        (root / "summary.json").write_text(json.dumps({"status": "finished", "val_after": {"val/score": 10.0 * x}}))
    return 0


def _write(tmp_path: Path, body: dict, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


def _sweep(tmp_path: Path, xs: list[int], **extra) -> str:
    return _write(tmp_path, {
        "name": "fake", "method": "grid", "metric": {"name": "val/score", "goal": "maximize"},
        "parameters": {"x": {"values": xs}, "counter": {"value": str(tmp_path / "counter.txt")}},
        "command": ["${env}", "${interpreter}", __file__, "${args}"], **extra})


def test_grid_is_the_product_in_file_order_capped_by_count(tmp_path):
    path = _write(tmp_path, {"method": "grid", "metric": {"name": "m"}, "command": ["${interpreter}", "${args}"],
                             "parameters": {"a": {"values": [1, 2]}, "b": {"value": "k"},
                                            "c": {"values": [0.1, 0.2, 0.3]}}})
    sweep = load_sweep(path)
    assert sweep["name"] == "s" and sweep["goal"] == "minimize"  # wandb's default goal
    trials = expand_trials(sweep)
    assert len(trials) == 6  # 2 x 1 x 3, the last parameter varying fastest
    assert [(t["a"], t["c"]) for t in trials] == [(1, 0.1), (1, 0.2), (1, 0.3), (2, 0.1), (2, 0.2), (2, 0.3)]
    assert all(t["b"] == "k" for t in trials)
    assert expand_trials(sweep, count=4) == trials[:4]
    assert expand_trials(sweep, count=100) == trials


def test_random_is_seeded_and_in_range(tmp_path):
    body = {"method": "random", "metric": {"name": "m", "goal": "maximize"}, "command": ["${interpreter}", "${args}"],
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1.0e-5, "max": 1.0e-3},
                           "n": {"distribution": "int_uniform", "min": 2, "max": 4},
                           "u": {"min": 0.5, "max": 1.5},  # no distribution: uniform, as wandb infers
                           "act": {"values": ["relu", "gelu"]}}}
    sweep = load_sweep(_write(tmp_path, body))
    assert sweep["kinds"] == {"lr": "log_uniform_values", "n": "int_uniform", "u": "uniform", "act": "categorical"}
    trials = expand_trials(sweep, count=200)
    assert trials == expand_trials(load_sweep(_write(tmp_path, body)), count=200)  # same seed, same trials
    assert expand_trials(sweep, count=5) == trials[:5]  # a larger --count extends a sweep
    assert trials != expand_trials(load_sweep(_write(tmp_path, {**body, "seed": 1})), count=200)
    lrs = [t["lr"] for t in trials]
    assert all(1e-5 <= v <= 1e-3 for v in lrs)
    # log-uniform: about half the draws below the geometric middle 1e-4 (the arithmetic middle would be ~5e-4)
    assert 0.35 < sum(v < 1e-4 for v in lrs) / len(lrs) < 0.65
    assert {t["n"] for t in trials} == {2, 3, 4} and {t["act"] for t in trials} == {"relu", "gelu"}
    assert all(0.5 <= t["u"] <= 1.5 for t in trials)


def test_args_expand_to_flags_with_the_trial_dirs(tmp_path):
    path = _write(tmp_path, {
        "method": "grid", "metric": {"name": "val/accuracy"},
        "parameters": {"model.init_args.optimizer.init_args.lr": {"values": [5.0e-5]},
                       "model.init_args.loss.beta": {"value": 0.0},
                       "data.init_args.val": {"value": {"task": "arithmetic", "n": 100}},
                       "trainer.logger": {"value": None}},
        "command": ["${env}", "${interpreter}", "-m", "lightning_rlhf", "fit", "--config", "r.yaml",
                    "--trainer.logger.init_args.save_dir=elsewhere", "${args}"]})
    sweep = load_sweep(path)
    argv = trial_argv(sweep, expand_trials(sweep)[0], tmp_path / "trial_1")
    assert argv[:6] == [sys.executable, "-m", "lightning_rlhf", "fit", "--config", "r.yaml"]  # ${env} dropped
    assert argv[7:] == ["--model.init_args.optimizer.init_args.lr=5e-05", "--model.init_args.loss.beta=0.0",
                        "--data.init_args.val={task: arithmetic, n: 100}", "--trainer.logger=null",
                        f"--trainer.default_root_dir={tmp_path / 'trial_1'}",
                        f"--trainer.logger.init_args.save_dir={tmp_path / 'trial_1'}",
                        f"--model.init_args.output_dir={tmp_path / 'trial_1' / 'model'}"]
    sweep["command"] = ["${interpreter}", "p.py", "--model.init_args.output_dir=null", "${args_no_hyphens}"]
    argv = trial_argv(sweep, {"a.b": 1}, tmp_path / "t")
    assert argv == [sys.executable, "p.py", "--model.init_args.output_dir=null", "a.b=1",
                    f"trainer.default_root_dir={tmp_path / 't'}"]


def test_leaderboard_best_first_failed_last():
    rows = [{"index": 1, "params": {"x": 1}, "status": "finished", "metric": 0.5, "wall_s": 1.0},
            {"index": 2, "params": {"x": 2}, "status": "failed", "metric": None, "wall_s": 2.0,
             "reason": "exit status 1"},
            {"index": 3, "params": {"x": 3}, "status": "finished", "metric": 0.7, "wall_s": 3.0},
            {"index": 4, "params": {"x": 4}, "status": "finished", "metric": 0.5, "wall_s": 4.0}]
    assert [(r["rank"], r["index"]) for r in leaderboard(rows, "maximize")] == [(1, 3), (2, 1), (3, 4), (4, 2)]
    assert [r["index"] for r in leaderboard(rows, "minimize")] == [1, 4, 3, 2]  # ties: lower index first
    table = leaderboard_markdown(leaderboard(rows, "maximize"), "val/score").splitlines()
    assert table[0] == "| rank | trial | val/score | x | wall s | status |"
    assert table[2] == "| 1 | 3 | 0.7000 | 3 | 3.0 | finished |"
    assert table[-1] == "| 4 | 2 | - | 2 | 2.0 | failed (exit status 1) |"


def test_state_keeps_the_last_row_of_a_trial_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    path.write_text('{"index": 1, "status": "failed"}\n{"index": 2, "status": "finished"}\n'
                    '{"index": 1, "status": "finished"}\n{"index": 3, "sta')
    assert {k: r["status"] for k, r in load_state(path).items()} == {1: "finished", 2: "finished"}
    assert path.read_text().endswith('{"index": 1, "status": "finished"}\n')  # the next row starts on its own line
    path.write_text('{"index": 1}\nnot json\n')
    with pytest.raises(ConfigError, match="trials.jsonl:2 is not a trial row .*delete that line"):
        load_state(path)


GOOD = {"method": "grid", "metric": {"name": "m"}, "parameters": {"a": {"values": [1]}},
        "command": ["${interpreter}", "${args}"]}


@pytest.mark.parametrize("change, message", [
    ({"method": "bayes"}, "local sweeps support grid and random: set `method: random`"),
    ({"method": "hyperband"}, "unknown method 'hyperband'"),
    ({"parameters": {"lr": {"min_value": 1}}}, "parameter 'lr' has no `values`, `value` or `distribution`"),
    ({"parameters": {"lr": 0.1}}, "parameter 'lr' must be a mapping"),
    ({"parameters": {"lr": {"distribution": "log_uniform_values", "min": 1.0e-4}}},
     "distribution 'log_uniform_values' needs `max`"),
    ({"parameters": {"lr": {"distribution": "uniformm", "min": 0, "max": 1}}}, "unknown distribution 'uniformm'"),
    ({"parameters": {"lr": {"distribution": "uniform", "min": 0, "max": 1}}}, "grid search cannot enumerate lr"),
    ({"parameters": {"lr": {"distribution": "log_uniform_values", "min": "1e-4", "max": 1}}}, "`min` must be a number"),
    ({"metric": None}, "needs `metric: {name: val/accuracy"),
    ({"command": ["${interpreter}", "train.py"]}, "`command` has no ${args}"),
    ({"command": ["${interpreter}", "${argz}"]}, "unknown macro ${argz}"),
])
def test_bad_files_name_the_problem(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("{", r"\{")):
        load_sweep(_write(tmp_path, {**GOOD, **change}))


def test_missing_and_malformed_files_and_bad_count(tmp_path):
    with pytest.raises(ConfigError, match="sweep file '.*nope.yaml' does not exist"):
        load_sweep(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("method: grid\nparameters: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_sweep(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="--count must be at least 1, got 0"):
        expand_trials(load_sweep(_write(tmp_path, GOOD)), count=0)
    with pytest.raises(ConfigError, match="random search has no end; pass --count N"):
        expand_trials(load_sweep(_write(tmp_path, {**GOOD, "method": "random"})))


def test_sweep_runs_ranks_and_skips_finished_trials(tmp_path, capsys):
    path, out = _sweep(tmp_path, [1, 3, 2, -1]), tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lightning_rlhf", "sweep", path, "--parallel", "2", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    board = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert [(r["index"], r["status"], r["metric"]) for r in board] == [
        (2, "finished", 30.0), (3, "finished", 20.0), (1, "finished", 10.0), (4, "failed", None)]
    assert board[3]["returncode"] == 3 and "boom: x must be positive" in board[3]["log_tail"]
    assert "| 4 | 4 | - | -1 |" in (out / "leaderboard.md").read_text() and "| 1 | 2 | 30.0000 | 3 |" in done.stdout
    assert (out / "trial_4" / "log.txt").read_text().startswith(f"$ {sys.executable} {__file__} --x=-1 --counter=")
    assert sorted((tmp_path / "counter.txt").read_text().split()) == ["-1", "1", "2", "3"]
    capsys.readouterr()
    run_sweep(path, out=str(out))  # rerun: nothing left to do
    assert "4 trials, 4 finished earlier" in capsys.readouterr().out
    assert len((tmp_path / "counter.txt").read_text().split()) == 4
    run_sweep(path, out=str(out), retry_failed=True)  # only the failed one again
    assert (tmp_path / "counter.txt").read_text().split()[-1] == "-1"
    assert len((tmp_path / "counter.txt").read_text().split()) == 5
    with pytest.raises(ConfigError, match=f"trial 1 ran with .*(the sweep file changed).*delete {out}"):
        run_sweep(_sweep(tmp_path, [5, 3, 2, -1]), out=str(out))


def test_killed_sweep_reruns_only_the_unfinished_trials(tmp_path):
    path, out = _sweep(tmp_path, [1, 2, 3]), tmp_path / "out"
    code = f"from lightning_rlhf.sweep import run_sweep; run_sweep({path!r}, out={str(out)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "FAKE_SLEEP": "60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    counter, deadline = tmp_path / "counter.txt", time.time() + 60
    while not (counter.exists() and counter.read_text().split() == ["1", "2"]) and time.time() < deadline:
        time.sleep(0.05)  # trial 1 finished, trial 2 started (and sleeps)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the sleeping trial 2
    proc.wait()
    assert [json.loads(r)["index"] for r in (out / "trials.jsonl").read_text().splitlines()] == [1]
    (out / "trial_2" / "stale.txt").write_text("left by the killed run")
    board = run_sweep(path, out=str(out))
    assert [(r["index"], r["metric"]) for r in board] == [(3, 30.0), (2, 20.0), (1, 10.0)]
    assert counter.read_text().split() == ["1", "2", "2", "3"]  # trial 1 ran once
    assert not (out / "trial_2" / "stale.txt").exists()  # the killed trial's dir was cleaned first
    assert len((out / "trials.jsonl").read_text().splitlines()) == 3


if __name__ == "__main__":
    sys.exit(fake_trial(sys.argv[1:]))


def test_a_killed_trial_with_a_checkpoint_continues_from_it(tmp_path):
    from lightning_rlhf.sweep import _start

    sweep = {"command": ["${interpreter}", "-c", "import sys; print(sys.argv[1:])", "${args}"]}
    env = dict(os.environ)
    (tmp_path / "trial_1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "trial_1" / "checkpoints" / "step=50.ckpt").write_bytes(b"x")
    (tmp_path / "trial_1" / "metrics.csv").write_text("step\n0\n")
    for k, resume in ((1, True), (2, True)):  # trial 2 has no checkpoint: a clean start, without --ckpt_path
        proc, log, _, d = _start(sweep, k, {"lr": 0.1}, tmp_path, env, resume)
        proc.wait()
        log.close()
        printed = (d / "log.txt").read_text()
        assert ("'--ckpt_path', 'last'" in printed) == (k == 1), printed
    assert (tmp_path / "trial_1" / "metrics.csv").exists()  # kept for the resumed run to continue
    # a failed trial retried (resume=False) starts clean even with a checkpoint
    proc, log, _, d = _start(sweep, 1, {"lr": 0.1}, tmp_path, env, False)
    proc.wait()
    log.close()
    assert not (d / "checkpoints").exists() and "--ckpt_path" not in (d / "log.txt").read_text()
