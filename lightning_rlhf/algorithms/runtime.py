"""Process-level settings and measurements: what makes CPU training fast, and which precision is fastest.

`cpu_model()` and `precision_report()` (behind `python -m lightning_rlhf doctor`) measure this machine's
fp32 / bf16 / fp16 matmul throughput, because the fastest precision differs between CPUs (native bf16 on
AMX or AVX512-BF16, emulated and slow elsewhere).

`half_precision_warning()`, at the start of every fit on a CPU, warns where the run's bf16 or fp16 matmuls are
under half of float32's speed here, naming the flags that switch to float32.

`keep_freed_memory()` tells glibc's allocator to keep freed blocks (up to 32 MiB each; no trimming of the
top of the heap, `mallopt(M_TRIM_THRESHOLD, -1)`) instead of returning them to the OS. A training step allocates and frees gigabytes of
activations; with glibc's defaults every step gets fresh pages from the kernel again, and the page faults
cost more than the arithmetic (a SmolLM2-135M forward with gradients: 10.9 s with 1.5 M page faults, 3.9 s
with 33 k once the heap is warm). Freed memory stays in the process, so RSS reflects the peak of a step.

Simplified: glibc (Linux) only, through `mallopt`; other allocators and platforms are left alone.
Blocks over 32 MiB (glibc's ceiling for the mmap threshold) are still mapped and unmapped each time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time

import torch

from lightning_rlhf.models.cpu_linear import onednn_available, onednn_mm

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DONE: list[bool] = []


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they were set."""
    if _DONE:
        return _DONE[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
        except (OSError, AttributeError):
            ok = False
    _DONE.append(ok)
    return ok


def cpu_model() -> str:
    """The CPU's model name and the flags that decide matmul speed (from /proc/cpuinfo; '' elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("model name\t", fields.get("model name", "")).strip()
    flags = set(fields.get("flags\t\t", fields.get("flags", "")).split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags]
    return f"{name} ({', '.join(wanted) or 'no AVX2'})"


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5, device: str = "cpu") -> float:
    """Measured GFLOP/s of an (n x n) @ (n x n) matmul in `dtype` on `device` (the machine's practical peak):
    on a CPU, the faster of torch's matmul and oneDNN's linear, which the models use for float32 where it is
    faster (`models/cpu_linear.py`; MKL's float32 matmul ran at half oneDNN's speed on an AMD EPYC)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = _gflops(lambda: a @ b, n, seconds, device)
    if device == "cpu" and dtype in (torch.float32, torch.bfloat16) and onednn_available(dtype):
        best = max(best, _gflops(lambda: onednn_mm(a, b), n, seconds, device))
    return best


def _gflops(matmul, n: int, seconds: float, device: str) -> float:
    matmul()
    _sync(device)
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        matmul()
        runs += 1
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fastest_dtype(speeds: dict[str, float], margin: float = 1.3) -> str:
    """The dtype to train and sample in, from measured {dtype: GFLOP/s}: a half precision only where its
    matmuls are at least `margin` times faster than float32 (mixed precision has costs beyond the matmuls:
    casts, fp32 master weights), else "float32". bfloat16 comes first when it passes (no loss scaling, fp32's
    range); float16 only where bfloat16 does not pass."""
    for half in ("bfloat16", "float16"):
        if speeds.get(half, 0.0) >= margin * speeds["float32"]:
            return half
    return "float32"


def matmul_speeds(device: str = "cpu") -> dict[str, float]:
    """{dtype: GFLOP/s} of fp32, bf16 and fp16 matmuls on `device`."""
    return {name: matmul_gflops(getattr(torch, name), device=device) for name in ("float32", "bfloat16", "float16")}


def precision_report(device: str = "cpu") -> tuple[dict[str, float], str]:
    """({dtype: GFLOP/s}, a recommendation) for fp32, bf16 and fp16 matmuls on `device`."""
    speeds = matmul_speeds(device)
    best = fastest_dtype(speeds)
    if best == "float32":
        return speeds, ("float32 is as fast as any other precision here: keep the recipes' precision: 32-true "
                        "and rollout.dtype null")
    return speeds, (f"{best} matmuls are {speeds[best] / speeds['float32']:.1f}x faster than float32 here: add "
                    f"--trainer.precision {TRAINER_PRECISION[best]} --model.init_args.rollout.dtype "
                    f"{best} (the old log-probs are then recomputed in the training precision: optim.old_logprobs)")


TRAINER_PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


SLOW_HALF = 0.5  # a half precision below this share of float32's matmul speed is called out at fit start


def half_precision_warning(precision: str, sampling_dtype: str | None = None) -> str | None:
    """On a CPU: a warning when the run's half precision (`trainer.precision` bf16/16, or the rollout's sampling
    dtype) has matmuls under SLOW_HALF of float32's speed here, as on CPUs that emulate bf16 (an AVX2-only AMD
    EPYC: 0.7 against 133 GFLOP/s); None otherwise. Measured with 256 x 256 matmuls, about 0.1-0.3 s."""
    precision = str(precision)  # Lightning's names: 32-true, bf16-mixed, bf16-true, 16-mixed, 16-true
    trained = {"bfloat16"} if precision.startswith("bf16") else {"float16"} if precision.startswith("16") else set()
    sampled = {sampling_dtype} & {"bfloat16", "float16"}
    if not trained | sampled:
        return None
    fp32 = matmul_gflops(torch.float32, n=256, seconds=0.05)
    speeds = {name: matmul_gflops(getattr(torch, name), n=256, seconds=0.05) for name in sorted(trained | sampled)}
    slow = {name: speed for name, speed in speeds.items() if speed < SLOW_HALF * fp32}
    if not slow:
        return None
    measured = ", ".join(f"{name} {speed:.1f}" for name, speed in slow.items())
    flags = (["--trainer.precision 32-true"] if trained else []) + \
        (["--model.init_args.rollout.dtype null"] if sampled else [])
    what = f"trainer.precision {precision}" + (f", rollout.dtype {sampling_dtype}" if sampling_dtype else "")
    return (f"{what}: {measured} GFLOP/s against float32 "
            f"{fp32:.0f} here (this CPU has no fast {' or '.join(slow)} matmuls), so this run will be far slower "
            f"than in float32; add {' '.join(flags)} (`python -m lightning_rlhf doctor` measures every precision)")
