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
