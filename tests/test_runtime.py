"""Process-level helpers: the allocator setting and the precision probe behind `python -m lightning_rlhf doctor`."""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_rlhf.algorithms.runtime import cpu_model, keep_freed_memory, matmul_gflops


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_sets_glibc_once():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def test_matmul_probe_measures_something():
    assert matmul_gflops(torch.float32, n=128, seconds=0.05) > 0.1
    assert isinstance(cpu_model(), str)


def test_doctor_prints_every_precision_and_advice(capsys):
    from lightning_rlhf.cli import main

    main(["doctor"])
    out = capsys.readouterr().out
    for name in ("float32", "bfloat16", "float16", "advice:"):
        assert name in out


@pytest.mark.parametrize("speeds, expected", [
    ({"float32": 200.0, "bfloat16": 940.0, "float16": 50.0}, "bfloat16"),  # 940 / 200 = 4.7x: AVX512-BF16 or AMX
    ({"float32": 200.0, "bfloat16": 250.0, "float16": 30.0}, "float32"),   # 250 / 200 = 1.25x < 1.3: not worth it
    ({"float32": 200.0, "bfloat16": 260.0, "float16": 30.0}, "bfloat16"),  # 260 / 200 = 1.3x: the margin exactly
    ({"float32": 150.0, "bfloat16": 20.0, "float16": 10.0}, "float32"),    # emulated half precision (no AVX-512)
    ({"float32": 60e3, "bfloat16": 700e3, "float16": 720e3}, "bfloat16"),  # a GPU: both pass, bf16 preferred
    ({"float32": 200.0, "bfloat16": 20.0, "float16": 900.0}, "float16"),   # 900 / 200 = 4.5x; bf16 fails
])
def test_fastest_dtype_needs_a_margin_over_float32(speeds, expected):
    from lightning_rlhf.algorithms.runtime import fastest_dtype

    assert fastest_dtype(speeds) == expected


@pytest.mark.parametrize("precision, sampling, speeds, named", [
    ("bf16-mixed", None, {"float32": 133.0, "bfloat16": 0.7}, ["bfloat16 0.7 GFLOP/s against float32 133"]),
    ("32-true", "bfloat16", {"float32": 133.0, "bfloat16": 0.7}, ["trainer.precision 32-true, rollout.dtype bfloat16: bfloat16 0.7"]),
    ("16-mixed", None, {"float32": 133.0, "float16": 60.0}, ["float16 60.0"]),  # 60 < 0.5 x 133 = 66.5
    ("16-mixed", None, {"float32": 133.0, "float16": 70.0}, []),  # 70 >= 66.5: not called out
    ("bf16-mixed", "bfloat16", {"float32": 150.0, "bfloat16": 700.0}, []),  # native bf16 (AMX): fine
])
def test_a_half_precision_this_cpu_only_emulates_is_called_out(monkeypatch, precision, sampling, speeds, named):
    from lightning_rlhf.algorithms import runtime

    monkeypatch.setattr(runtime, "matmul_gflops", lambda dtype, **_: speeds[str(dtype).split(".")[-1]])
    warning = runtime.half_precision_warning(precision, sampling)
    if not named:
        assert warning is None
        return
    assert all(word in warning for word in named), warning
    # the flags that switch what is slow, and only those: SFT and reward models have no rollout.dtype
    flags = warning.split("; add ")[1].split(" (")[0]
    want = (["--trainer.precision 32-true"] if precision != "32-true" else []) + \
        (["--model.init_args.rollout.dtype null"] if sampling else [])
    assert flags == " ".join(want), warning


def test_float32_runs_measure_nothing(monkeypatch):
    from lightning_rlhf.algorithms import runtime

    monkeypatch.setattr(runtime, "matmul_gflops", lambda *a, **k: pytest.fail("measured a float32 run"))
    assert runtime.half_precision_warning("32-true", None) is None
    assert runtime.half_precision_warning("32-true", "float32") is None
