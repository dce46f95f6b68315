"""The multi-stage runner: outputs passed by name, plan checks, and a rerun after a kill skips finished stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lightning_rlhf.errors import ConfigError
from lightning_rlhf.pipeline import load_plan, resolve_precision, stage_command


def _plan(tmp_path, model):
    stages = [
        {"name": "sft", "recipe": "recipes/quickstart.yaml",
         "overrides": {"model.init_args.policy": str(model), "trainer.max_steps": 2, "trainer.val_check_interval": 2,
                       "data.init_args.val": {"task": "arithmetic_sft", "n": 8, "split": "val", "seed": 1}}},
        {"name": "rs", "sample": {"policy": "@sft", "data": {"task": "arithmetic", "n": 8, "split": "val", "seed": 1},
                                  "rewards": {"format": 1.0}, "keep": {"total": 0.0}, "k": 2, "max_new_tokens": 8}},
        {"name": "rs_sft", "recipe": "recipes/quickstart.yaml",
         "overrides": {"model.init_args.policy": str(model), "data.init_args.train": {"path": "@rs"},
                       "trainer.max_steps": 2, "trainer.val_check_interval": 2,
                       "data.init_args.val": {"task": "arithmetic_sft", "n": 8, "split": "val", "seed": 1}}},
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


def test_outputs_are_passed_by_name(tmp_path):
    path = _plan(tmp_path, "m")
    (stages, _), out = load_plan(str(path)), tmp_path / "out"
    outputs = {"sft": str(out / "sft" / "model"), "rs": str(out / "rs" / "samples.jsonl")}
    cmd = stage_command(stages[2], out, outputs)
    assert cmd[cmd.index("--data.init_args.train") + 1] == f"{{path: {out}/rs/samples.jsonl}}"
    assert cmd[cmd.index("--trainer.max_steps") + 1] == "2"
    sample = stage_command(stages[1], out, outputs)
    assert sample[0] == "sample" and sample[sample.index("--policy") + 1] == f"{out}/sft/model"
    assert sample[-2:] == ["--out", f"{out}/rs/samples.jsonl"]


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "recipe": "r.yaml"}, {"name": "a", "recipe": "r.yaml"}], "stage 2 needs a new 'name'"),
    ([{"name": "a", "recipe": "r.yaml", "sample": {}}], "exactly one of 'recipe' or 'sample'"),
    ([{"name": "a", "recipe": "r.yaml", "overrides": {"x": "@b"}}, {"name": "b", "recipe": "r.yaml"}],
     "uses '@b', which is not an earlier stage"),
])
def test_bad_plans_are_named(tmp_path, stages, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ConfigError, match=message):
        load_plan(str(path))


def _last(cmd: list[str], flag: str) -> str:
    """The value the command line gives `flag` (jsonargparse and argparse keep the last occurrence)."""
    return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]


def test_settings_apply_in_order_and_precision_becomes_flags(tmp_path):
    # Later wins: precision flags < the plan's fit_overrides < the stage's overrides < a later file's
    # (sample stages alike).
    plan = {"precision": "bf16-mixed", "fit_overrides": {"trainer.max_steps": 7, "trainer.log_every_n_steps": 3},
            "sample_overrides": {"device": "cpu", "k": 3},
            "stages": [{"name": "sft", "recipe": "recipes/sft/tiny_arithmetic.yaml",
                        "overrides": {"trainer.max_steps": 2, "trainer.log_every_n_steps": 4}},
                       {"name": "rl", "recipe": "recipes/r1_zero/tiny_arithmetic.yaml"},
                       {"name": "rs", "sample": {"policy": "@rl", "data": {"task": "arithmetic", "n": 4}, "k": 2}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan))
    (tmp_path / "late.yaml").write_text(yaml.safe_dump({"precision": "32-true", "sample_overrides": {"k": 4},
                                                        "fit_overrides": {"trainer.log_every_n_steps": 5}}))
    stages, settings = load_plan(str(tmp_path / "p.yaml"))
    dtype, speeds = resolve_precision(settings)
    assert (dtype, speeds) == ("bfloat16", {})
    outputs, out = {"sft": "o/sft", "rl": "o/rl"}, tmp_path / "o"
    sft, rl, rs = (stage_command(st, out, outputs, settings, dtype) for st in stages)
    assert _last(sft, "--trainer.precision") == "bf16-mixed" and "--model.init_args.rollout.dtype" not in sft
    assert _last(rl, "--trainer.precision") == "bf16-mixed" and _last(rl, "--model.init_args.rollout.dtype") == "bfloat16"
    assert _last(sft, "--trainer.max_steps") == "2" and _last(rl, "--trainer.max_steps") == "7"
    assert _last(rs, "--dtype") == "bfloat16" and _last(rs, "--device") == "cpu"
    assert _last(rs, "--k") == "2"  # the stage's own sample options win over sample_overrides
    stages, settings = load_plan(str(tmp_path / "p.yaml"), str(tmp_path / "late.yaml"))
    dtype, _ = resolve_precision(settings)
    sft, rl, rs = (stage_command(st, out, outputs, settings, dtype) for st in stages)
    assert dtype == "float32" and _last(sft, "--trainer.precision") == "32-true" and _last(rs, "--k") == "4"
    assert _last(rl, "--model.init_args.rollout.dtype") == "null" and "--dtype" not in rs
    assert _last(sft, "--trainer.log_every_n_steps") == "5" and _last(rl, "--trainer.log_every_n_steps") == "5"


def test_auto_precision_measures_and_needs_a_margin(monkeypatch):
    import lightning_rlhf.algorithms.runtime as runtime

    speeds = {"float32": 200.0, "bfloat16": 900.0, "float16": 40.0}
    monkeypatch.setattr(runtime, "matmul_gflops", lambda dtype, device="cpu": speeds[str(dtype).split(".")[1]])
    settings = {"precision": "auto", "late_fit_overrides": {}, "late_sample_overrides": {}}
    assert resolve_precision(settings) == ("bfloat16", speeds)  # 900 / 200 = 4.5x
    speeds["bfloat16"] = 240.0  # 1.2x: not worth mixed precision
    assert resolve_precision(settings)[0] == "float32"


@pytest.mark.parametrize("extra, message", [
    ({"stages": []}, r"unknown keys \['stages'\]; a file after the pipeline file may set only"),
    ({"precision": "fp8"}, "pipeline precision 'fp8' is not one of auto, 32-true, bf16-mixed, 16-mixed"),
])
def test_bad_settings_files_are_named(tmp_path, extra, message):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [{"name": "a", "recipe": "r.yaml"}]}))
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(extra))
    with pytest.raises(ConfigError, match=message):
        resolve_precision(load_plan(str(tmp_path / "p.yaml"), str(tmp_path / "x.yaml"))[1])


def test_kill_between_stages_then_rerun_skips_finished_stages(tmp_path, tiny_model_dir):
    path, out = _plan(tmp_path, tiny_model_dir), tmp_path / "out"
    cmd = [sys.executable, "-m", "lightning_rlhf", "pipeline", str(path), "--output_dir", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "sft" / "summary.json"
    deadline = time.time() + 300
    while not (first.exists() and '"finished"' in first.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and the stage it started
    proc.wait()
    assert not (out / "summary.json").exists()  # killed before the end
    stamp = first.stat().st_mtime_ns
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "pipeline stage 'sft': finished earlier, skipped" in done.stdout
    assert first.stat().st_mtime_ns == stamp  # not rerun
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft", "rs", "rs_sft"]
    assert all(s["wall_s"] > 0 and "val/accuracy" in s for s in summary["stages"] if s["name"] != "rs")
    rs = summary["rejection_sampling"]
    assert rs["sampled"] == 16 and rs["kept"] == len((out / "rs" / "samples.jsonl").read_text().splitlines())
