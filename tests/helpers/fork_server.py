"""`python tests/helpers/fork_server.py`: run command lines one at a time, each in a child forked from a process
that imported the package once (the commands of `run_cases.py`, sent one by one instead of as one batch).

Each line on stdin is a job: {"argv": [what follows the interpreter], "cwd", "stdout", "stderr", "env"}. The
server forks a child, which takes `env` as its whole environment (torch's thread count too, from
OMP_NUM_THREADS), reads stdin from /dev/null and runs the job as `run_cases.run_job` does. The server writes
{"pid": child} when the child starts and {"code": exit status} when it ends, one JSON line each, so the client
can kill a child that runs too long. Used by `tests/conftest.py: cli` so that a test's `fit` or parse-error run
costs its own work, not the ~10 s of importing torch, Lightning and transformers again.

Simplified: POSIX only; PYTHONHASHSEED and other settings read at interpreter start are the server's.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_cases import preload, run_job  # noqa: E402


def _child(job: dict) -> int:
    os.environ.clear()
    os.environ.update(job["env"])
    threads = job["env"].get("OMP_NUM_THREADS")
    if threads:  # torch read the server's value at import; this child's is the job's
        import torch

        torch.set_num_threads(int(threads))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return run_job(job)


def serve() -> None:
    out = sys.stdout
    for line in sys.stdin:
        job = json.loads(line)
        out.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(job)
            finally:
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


if __name__ == "__main__":
    preload()
    serve()
