"""`python tests/helpers/run_cases.py JOBS.json [WORKERS]`: run many command lines, each in its own process.

JOBS.json is a list of {"argv": [what follows the interpreter], "cwd", "stdout", "stderr", "fresh": bool}. The
runner imports the package once, then forks one child per job, WORKERS (default 3) at a time. A child changes to
`cwd`, points its stdout and stderr (file descriptors 1 and 2) at the two files and runs the command as the
interpreter would: `-m MODULE args` through runpy as `__main__`, or a script path as `__main__`. Its exit status is
the command's: SystemExit's code, or 1 after an uncaught exception (its traceback printed to stderr). A `fresh`
job execs a new interpreter instead (`python <argv>`), nothing shared. The exit statuses are printed as one JSON
list, in job order.

Why: most of a failing command's time is importing torch, Lightning and transformers (about 5 s of CPU); a
forked child starts with them imported, so a catalogue of a few dozen commands runs in a fraction of the time.
Simplified: POSIX only (os.fork); every job gets the runner's environment; no per-job timeout.
"""

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _redirect(job: dict) -> None:
    os.chdir(job["cwd"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)


def run_job(job: dict) -> int:
    """Run one job in this (forked) process; its exit status."""
    _redirect(job)
    argv = job["argv"]
    if job.get("fresh"):
        os.execv(sys.executable, [sys.executable, *argv])
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def run_all(jobs: list[dict], workers: int) -> list[int]:
    """Fork a child per job, `workers` at a time; the exit statuses in job order."""
    codes: list[int] = [-1] * len(jobs)
    running: dict[int, int] = {}
    todo = list(range(len(jobs)))
    while todo or running:
        while todo and len(running) < workers:
            i = todo.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_job(jobs[i])
                finally:
                    os._exit(code)
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


def preload() -> None:
    """Import what every job imports anyway, so that a forked child starts with it loaded."""
    import lightning_rlhf.algorithms  # noqa: F401
    import lightning_rlhf.cli  # noqa: F401
    import lightning_rlhf.data  # noqa: F401
    import lightning_rlhf.rewards  # noqa: F401
    from transformers import (  # noqa: F401
        LlamaForCausalLM, LlamaForSequenceClassification, LlamaForTokenClassification,
    )


if __name__ == "__main__":
    preload()
    jobs = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(run_all(jobs, int(sys.argv[2]) if len(sys.argv) > 2 else 3)))
