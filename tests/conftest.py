"""Shared pytest fixtures: one tiny Llama + tokenizer per session, and the `slow` marker."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s (deselect with -m 'not slow')")


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
