"""Shared pytest fixtures: one tiny Llama + tokenizer per session, and the `slow` marker."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (deselect with -m 'not slow')")
    share_cores_among_workers()


def share_cores_among_workers() -> None:
    """Under pytest-xdist (`-n N`), give each worker its share of the cores, for torch here and for the
    subprocesses that tests start: N workers of a full-width thread pool each oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """HF-format dir of a random tiny Llama (vocab 512, hidden 64, 2 layers, 4 heads) and its tokenizer."""
    from lightning_rlhf.models import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny_model") / "model", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tokenizer of `tiny_model_dir` (left padding, pad `<|pad|>`, eos `<|im_end|>`, ChatML template)."""
    from lightning_rlhf.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
