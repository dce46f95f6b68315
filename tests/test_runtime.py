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
