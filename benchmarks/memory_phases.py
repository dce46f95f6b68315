"""Where a GRPO step's peak RSS falls: runs our side of grpo_vs_trl.py (`_ours.py`, same flags) with a thread
that reads /proc/self/statm every 2 ms and tags each reading with the stage method running (rollout, its
`generate`, reference pass, loss forward, backward, optimizer step). Prints the peak per phase, and at the
overall peak the split of RSS into anonymous memory and file pages (/proc/self/smaps_rollup). Linux only.

    cd benchmarks
    python memory_phases.py --model ../checkpoints/smollm2-135m-instruct --prompts P --steps 4 \\
        --micro-batch-size 4 [--release-ref-pages | --keep-ref-pages] [--glibc-defaults] [--trim-before-reference]

P: a JSON list of prompt strings (`grpo_vs_trl.py` writes one to a temporary directory; any will do).
`--glibc-defaults` leaves glibc's allocator as it is (no `keep_freed_memory`); `--trim-before-reference`
returns the allocator's free memory to the kernel (`malloc_trim(0)`) before each reference pass.
"""

from __future__ import annotations

import ctypes
import functools
import os
import runpy
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = os.sysconf("SC_PAGE_SIZE")
SMAPS_FIELDS = ("Rss:", "Anonymous:", "Pss_File:")


class PhaseSampler:
    """Peak RSS per innermost pair of running phases, and the smaps split at the overall peak."""

    def __init__(self) -> None:
        self.stack, self.peaks, self.top, self.split = ["start"], {}, 0.0, {}

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20

    def poll(self) -> None:
        while True:
            rss, phase = self.rss_mb(), "/".join(self.stack[-2:])
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), rss)
            if rss > self.top + 16:  # a new peak (by more than 16 MB): read the split once
                self.top = rss
                lines = open("/proc/self/smaps_rollup").read().splitlines()[1:]
                self.split = {f[0]: int(f[1]) // 1024 for f in map(str.split, lines) if f[0] in SMAPS_FIELDS}
                self.split["phase"] = phase
            time.sleep(0.002)

    def wrap(self, owner: type, name: str, label: str | None = None) -> None:
        func = getattr(owner, name)

        @functools.wraps(func)
        def tagged(*args, **kwargs):
            self.stack.append(label or name)
            try:
                return func(*args, **kwargs)
            finally:
                self.stack.pop()

        setattr(owner, name, tagged)

    def report(self) -> None:
        for phase, mb in sorted(self.peaks.items(), key=lambda kv: -kv[1])[:10]:
            print(f"peak {mb:8.0f} MB  in {phase}")
        print("at the overall peak (MB): " + ", ".join(f"{k.rstrip(':')} {v}" for k, v in self.split.items()))


def main() -> None:
    args = sys.argv[1:]
    glibc_defaults = "--glibc-defaults" in args
    trim = "--trim-before-reference" in args
    args = [a for a in args if a not in ("--glibc-defaults", "--trim-before-reference")]
    import torch

    from lightning_rlhf.algorithms import grpo, rl_stage, runtime
    from lightning_rlhf.rollout import static

    if glibc_defaults:
        runtime._DONE.append(False)  # keep_freed_memory() then leaves the allocator alone
    sampler = PhaseSampler()
    for name in ("rollout_and_score", "reference_logprobs", "old_logprobs", "policy_loss", "step_models"):
        sampler.wrap(rl_stage.RLStage, name)
    sampler.wrap(grpo.GRPO, "update")
    sampler.wrap(static.StaticCacheEngine, "_generate", "generate")
    sampler.wrap(torch.Tensor, "backward")
    if trim:
        libc, reference = ctypes.CDLL("libc.so.6"), rl_stage.RLStage.reference_logprobs
        rl_stage.RLStage.reference_logprobs = lambda self, ro: (libc.malloc_trim(0), reference(self, ro))[1]
    threading.Thread(target=sampler.poll, daemon=True).start()
    sys.argv = [str(HERE / "_ours.py"), *args]
    sys.path.insert(0, str(HERE))
    try:
        runpy.run_path(str(HERE / "_ours.py"), run_name="__main__")
    finally:
        sampler.report()


if __name__ == "__main__":
    main()
