"""Shared pytest fixtures: one tiny Llama + tokenizer per session, the `slow` marker, and `cli`: command lines run
in children forked from one process that imported the package once (`tests/helpers/fork_server.py`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


class ForkedRuns:
    """`run(argv, cwd, env, timeout)`: what `subprocess.run([sys.executable, *argv], cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)` gives, from a child of this worker's fork server (started
    at the first call; its PYTHONHASHSEED is 0). A run past `timeout` is killed and raises TimeoutExpired."""

    def __init__(self) -> None:
        self.server: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
        return subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers" / "fork_server.py")], cwd=REPO,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], cwd: str | Path, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory() as d:
            if self.server is None or self.server.poll() is not None:
                self.server = self._start()
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            job = {"argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "env": dict(os.environ if env is None else env)}
            self.server.stdin.write(json.dumps(job) + "\n")
            self.server.stdin.flush()
            pid = json.loads(self.server.stdout.readline())["pid"]
            reply: list[str] = []
            reader = threading.Thread(target=lambda: reply.append(self.server.stdout.readline()))
            reader.start()
            reader.join(timeout)
            if reader.is_alive():
                os.kill(pid, signal.SIGKILL)
                reader.join()
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read_text(), err.read_text())
            code = json.loads(reply[0])["code"]
            return subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


@pytest.fixture(scope="session")
def cli():
    """A `ForkedRuns` for this test session (one per xdist worker)."""
    runs = ForkedRuns()
    yield runs
    runs.close()
