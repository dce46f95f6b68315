"""Fused decode kernels for a CPU (`decode_kernels.c`), compiled once per machine, called through ctypes.

On a CPU the eager decode step of a small model is many small torch kernels: an RMSNorm alone is seven, and
the two batched attention matmuls of one new query per row run at a few GFLOP/s. `decode_kernels.c` does a
residual add with the next RMSNorm, the rotary embedding, SiLU times the up projection, and a whole attention
(the new key and value written into the cache, scores, softmax, weighted sum) in one pass each; `sample` draws
the next tokens from the logits (softmax, banned tokens, the inverse of the cumulative distribution) in three
passes over each row. The projections stay torch's (MKL or oneDNN).

`decode_step.c` includes this file and adds `lr_decode_step`, a whole float32 decode step of a small model in one
call (`decode_step.py`). `kernels()` compiles it, and so both files, with the system's C compiler (`$CC`, else
`cc`; `-O3 -march=native -fopenmp`, about a second) into `~/.cache/lightning_rlhf/kernels/` (or
`$LIGHTNING_RLHF_KERNELS_DIR`), under a name that hashes the sources, the flags and this CPU's feature flags, so a
cache shared between machines never hands one a binary built for another. It returns None, and says why once, where there is no compiler or the build fails;
the engine then decodes eagerly. `LIGHTNING_RLHF_KERNELS=0` turns them off, `=1` makes a failed build an error.

The library links the OpenMP runtime that torch already loaded (same soname), so the kernels share torch's
threads and its thread count (`torch.set_num_threads`).

Models in float32 or bfloat16 (a float16 rollout decodes eagerly); head sizes that are multiples of 16. In
bfloat16 the kernels compute in float32 and round where torch's bfloat16 kernels round. The attention on a CPU
with bfloat16 dot products (AVX512_BF16, `pairs_layout()`) rounds its queries and weights to bfloat16 as the eager
step does and sums in float32 (`vdpbf16ps`: two products per lane and instruction, no widening); elsewhere
it keeps them float32.

The caches the attention reads are in the kernels' layout (`cache_keys`, `cache_values`): columns in blocks of
KEY_BLOCK, keys transposed in each block (a block of scores reads one contiguous stretch), and in the pairs layout
two neighbouring head dimensions (keys) or columns (values) side by side, as the bfloat16 dot products take them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("decode_kernels.c")  # the per-operation kernels
STEP_SOURCE = SOURCE.with_name("decode_step.c")  # includes SOURCE and TRAIN_SOURCE: the file the build compiles
TRAIN_SOURCE = SOURCE.with_name("train_kernels.c")  # RMSNorm, SiLU product, token log-probs: forward, backward
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
ENV, DIR_ENV = "LIGHTNING_RLHF_KERNELS", "LIGHTNING_RLHF_KERNELS_DIR"
_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_BY_DTYPE = {  # each kernel has a float32 version and a bfloat16 one (name_bf16)
    "lr_add_rms_norm": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _F32],
    "lr_silu_mul": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64],
    "lr_rope": [_PTR, _I64, _PTR, _PTR, _PTR, _PTR] + [_I64] * 4,
    "lr_attend": [_PTR] * 10 + [_I64] * 9,
    "lr_sample": [_PTR, _I64, _I64, _F32, _PTR, _PTR, _I64, _PTR, _PTR],
}
SIGNATURES = {**_BY_DTYPE, **{f"{name}_bf16": args for name, args in _BY_DTYPE.items()}, "lr_decode_step": [_PTR],
              "lr_rms_norm_fwd": [_PTR] * 4 + [_I64, _I64, _F32], "lr_rms_norm_bwd": [_PTR] * 6 + [_I64, _I64],
              "lr_silu_mul_bwd": [_PTR] * 5 + [_I64],
              "lr_token_logprobs_fwd": [_PTR] * 5 + [_I64, _I64, _F32],
              "lr_token_logprobs_bwd": [_PTR] * 5 + [_I64, _I64, _F32]}
RETURNS_INT = ("lr_bf16_pairs", "lr_step_columns")  # kernels without arguments that return an int
DTYPES = (torch.float32, torch.bfloat16)  # the model dtypes the kernels take
KEY_BLOCK = 32  # cache columns per block of keys (`cache_keys`)


def _forced() -> bool | None:
    value = os.environ.get(ENV, "").strip()
    if value and value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: set it to 0 (decode with torch's kernels), 1 (the fused kernels, "
                         "failing if they cannot be built) or leave it unset (use them where they build)")
    return None if not value else value == "1"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def library_path(compiler: str) -> Path:
    """Where the build for these sources, compiler, flags and CPU lives."""
    parts = [SOURCE.read_bytes(), STEP_SOURCE.read_bytes(), TRAIN_SOURCE.read_bytes(), compiler.encode(),
             " ".join(FLAGS).encode(), _cpu_flags().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    root = Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "lightning_rlhf" / "kernels")
    return root / f"decode-{key}.so"


def build(compiler: str, target: Path, source: Path = STEP_SOURCE) -> None:
    """Compile `source` (default: the engine's kernels, both files) with FLAGS into the shared library `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: concurrent builds are safe
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(source), "-o", str(out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {proc.stderr.strip()[-1500:]}")
        os.replace(out, target)


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None where it cannot be had (see the module docstring)."""
    forced = _forced()
    if forced is False:
        return None
    compiler = os.environ.get("CC") or "cc"
    try:
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C compiler {compiler!r} on PATH (set $CC)")
        target = library_path(compiler)
        if not target.exists():
            log.info("building the fused CPU decode kernels once into %s", target)
            build(compiler, target)
        lib = ctypes.CDLL(str(target))
        for name, args in SIGNATURES.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
        for name in RETURNS_INT:
            getattr(lib, name).argtypes, getattr(lib, name).restype = [], ctypes.c_int
        return lib
    except (OSError, RuntimeError) as err:
        if forced:
            raise RuntimeError(f"{ENV}=1 but the fused CPU decode kernels are not available: {err}") from err
        log.warning("fused CPU decode kernels unavailable (%s); decoding with torch's kernels, a little slower. "
                    "Set %s=0 to skip this attempt.", err, ENV)
        return None


def usable(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether a decode in `dtype` with this head size on `device` can use the kernels (building them if needed)."""
    return device.type == "cpu" and dtype in DTYPES and head_dim % 16 == 0 and kernels() is not None


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contiguous(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise ValueError(f"fused decode kernel given a non-contiguous tensor of shape {tuple(t.shape)}")


def _variant(name: str, *tensors: Tensor | None, float32: tuple[Tensor | None, ...] = ()) -> ctypes._CFuncPtr:
    """The kernel `name` for the dtype of `tensors` (float32, or bfloat16: `name`_bf16), which must all have it;
    the `float32` ones must be float32 in either case."""
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t is not None and t.dtype != dtype for t in tensors):
        raise ValueError(f"{name}: tensors of dtypes {[None if t is None else t.dtype for t in tensors]}; they "
                         "must all be float32 or all bfloat16")
    if any(t is not None and t.dtype != torch.float32 for t in float32):
        raise ValueError(f"{name}: {[t.dtype for t in float32 if t is not None]} where float32 is needed")
    return getattr(kernels(), name if dtype == torch.float32 else f"{name}_bf16")


def add_rms_norm(x: Tensor, y: Tensor | None, weight: Tensor, eps: float) -> Tensor:
    """x += y in place (y None: no add), then RMSNorm(x) * weight -> a new tensor. x, y: (..., d) contiguous."""
    _contiguous(x, y, weight)
    out = torch.empty_like(x)
    d = x.shape[-1]
    _variant("lr_add_rms_norm", x, y, weight)(_p(x), _p(y), _p(weight), _p(out), x.numel() // d, d, eps)
    return out


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for (n, m) row views (a stacked output's two halves are fine) -> (n, m) contiguous."""
    n, m = gate.shape
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_mul needs rows of contiguous floats")
    out = gate.new_empty(n, m)
    _variant("lr_silu_mul", gate, up)(_p(gate), gate.stride(0), _p(up), up.stride(0), _p(out), n, m)
    return out


@functools.cache
def pairs_layout() -> bool:
    """Whether the kernels' bfloat16 attention uses this CPU's bfloat16 dot products (AVX512_BF16), and with them
    the "pairs" cache layout (see `cache_keys`, `cache_values`)."""
    lib = kernels()
    return False if lib is None else bool(lib.lr_bf16_pairs())


def _pairs(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and pairs_layout()


def _columns(p: int, columns: int | None) -> int:
    return -(-max(p, columns or 0) // KEY_BLOCK) * KEY_BLOCK


def cache_keys(keys: Tensor, columns: int | None = None) -> Tensor:
    """Keys (..., P, hd) in the kernels' cache layout, for C = `columns` (default P) rounded up to a multiple of
    KEY_BLOCK: blocks of KEY_BLOCK columns, each transposed, (..., C / KEY_BLOCK, hd, KEY_BLOCK), so that a block
    of score columns reads one contiguous stretch; in bfloat16 with `pairs_layout()`, (..., C / KEY_BLOCK, hd / 2,
    KEY_BLOCK, 2): head dimensions 2i and 2i + 1 side by side in each column, as the bfloat16 dot products take
    them. Columns past P are 0 (P = 0: unset, a cache to fill)."""
    *lead, p, hd = keys.shape
    c, pairs = _columns(p, columns), _pairs(keys.dtype)
    shape = (*lead, c // KEY_BLOCK, hd // 2, KEY_BLOCK, 2) if pairs else (*lead, c // KEY_BLOCK, hd, KEY_BLOCK)
    if p == 0:
        return keys.new_empty(shape)
    keys = torch.cat([keys, keys.new_zeros(*lead, c - p, hd)], dim=-2) if c > p else keys
    if pairs:
        return keys.reshape(*lead, c // KEY_BLOCK, KEY_BLOCK, hd // 2, 2).transpose(-3, -2).contiguous()
    return keys.reshape(*lead, c // KEY_BLOCK, KEY_BLOCK, hd).transpose(-1, -2).contiguous()


def cache_values(values: Tensor, columns: int | None = None) -> Tensor:
    """Values (..., P, hd) in the kernels' cache layout, C columns as `cache_keys`: (..., C, hd); in bfloat16
    with `pairs_layout()`, (..., C / 2, hd, 2): columns 2j and 2j + 1 side by side in each head dimension.
    Columns past P are 0 (P = 0: a cache to fill, zeroed in the pairs layout, whose unwritten neighbours of the
    last column are read with weight 0)."""
    *lead, p, hd = values.shape
    c, pairs = _columns(p, columns), _pairs(values.dtype)
    if c > p:
        values = torch.cat([values, values.new_zeros(*lead, c - p, hd)], dim=-2)
    if pairs:
        return values.reshape(*lead, c // 2, 2, hd).transpose(-1, -2).contiguous()
    return values.contiguous()


def plain_keys(cached: Tensor) -> Tensor:
    """The (..., C, hd) keys of a `cache_keys` layout (a copy)."""
    if _pairs(cached.dtype):
        *lead, blocks, half, kb, _ = cached.shape
        return cached.transpose(-3, -2).reshape(*lead, blocks * kb, 2 * half)
    *lead, blocks, hd, kb = cached.shape
    return cached.transpose(-1, -2).reshape(*lead, blocks * kb, hd)


def plain_values(cached: Tensor) -> Tensor:
    """The (..., C, hd) values of a `cache_values` layout."""
    if _pairs(cached.dtype):
        *lead, half, hd, _ = cached.shape
        return cached.transpose(-1, -2).reshape(*lead, 2 * half, hd)
    return cached


def _cache_columns(k: Tensor, v: Tensor) -> int:
    """The columns of a key and value cache in the kernels' layout (`cache_keys`, `cache_values`)."""
    n, kv, hd = v.shape[0], v.shape[1], v.shape[3]
    pairs = _pairs(k.dtype)
    cols = k.shape[2] * KEY_BLOCK
    want_k = (n, kv, cols // KEY_BLOCK, hd // 2, KEY_BLOCK, 2) if pairs else (n, kv, cols // KEY_BLOCK, hd, KEY_BLOCK)
    want_v = (n, kv, cols // 2, hd, 2) if pairs else (n, kv, cols, hd)
    if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
        raise ValueError(f"keys of shape {tuple(k.shape)} with values {tuple(v.shape)}: a cache must be in the "
                         f"kernels' layout (`cache_keys`, `cache_values`: blocks of {KEY_BLOCK} columns), keys "
                         f"{want_k} and values {want_v} here")
    return cols


def rope(qk: Tensor, cos: Tensor, sin: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Rotate (n, heads + kv_heads, hd) queries and keys (rows may be strided) by cos, sin (n, heads + kv_heads,
    hd) float32 -> queries (n, heads, hd) float32 and keys (n, kv_heads, hd) in qk's dtype (float32 or bfloat16;
    the rotation in float32, the keys rounded once)."""
    n, all_heads, hd = qk.shape
    if qk.stride(2) != 1 or qk.stride(1) != hd:
        raise ValueError("rope needs each row's heads as contiguous vectors")
    _contiguous(cos, sin)
    q, k = qk.new_empty(n, heads, hd, dtype=torch.float32), qk.new_empty(n, all_heads - heads, hd)
    _variant("lr_rope", qk, k, float32=(cos, sin))(_p(qk), qk.stride(0), _p(cos), _p(sin), _p(q), _p(k), n, heads,
                                                    all_heads - heads, hd)
    return q, k


def attend(q: Tensor, prompt_k: Tensor, prompt_v: Tensor, prompt_len: int, prompt_bias: Tensor | None,
           prompt_of_row: Tensor, k: Tensor, v: Tensor, new_k: Tensor, new_v: Tensor, width: int) -> Tensor:
    """Write the new token's key and value (new_k (n, kv, hd); new_v (n, kv, hd), rows may be strided) into each
    row's cache at column width - 1; then softmax(q k^T + bias) v of each row over the first `prompt_len`
    columns of its prompt's keys/values and the first `width` of its own. q (n, heads, hd) float32, pre-scaled,
    the heads of one key/value head adjacent; prompt_k, prompt_v: (prompts, kv, ...) and k, v: (n, kv, ...) in the
    kernels' layout (`cache_keys`, `cache_values`); prompt_bias (prompts, prompt_len) float32 (0, or -inf at
    padding) or None; prompt_of_row (n,) int64: the prompt each row samples from. Caches and new keys/values
    float32 or bfloat16 -> (n, heads, hd) in their dtype."""
    _contiguous(q, prompt_k, prompt_v, prompt_bias, prompt_of_row, k, v, new_k)
    n, heads, hd = q.shape
    kv_heads, pcols, cols = v.shape[1], _cache_columns(prompt_k, prompt_v), _cache_columns(k, v)
    if prompt_of_row.dtype != torch.int64 or prompt_of_row.shape != (n,) or not 1 <= width <= cols or not (
            0 <= prompt_len <= pcols):
        raise ValueError(f"attend: prompt_of_row must be ({n},) int64, 1 <= width <= {cols} and 0 <= prompt_len <= "
                         f"{pcols}; got {prompt_of_row.dtype} {tuple(prompt_of_row.shape)}, width {width}, "
                         f"prompt_len {prompt_len}")
    if new_k.shape != (n, kv_heads, hd) or new_v.shape != new_k.shape or new_v.stride()[1:] != (hd, 1):
        raise ValueError(f"attend: the new keys {tuple(new_k.shape)} and values {tuple(new_v.shape)} must be "
                         f"({n}, {kv_heads}, {hd}), each row's values contiguous")
    out = torch.empty_like(q, dtype=k.dtype)
    _variant("lr_attend", prompt_k, prompt_v, k, v, new_k, new_v, float32=(q, prompt_bias))(
        _p(q), _p(prompt_k), _p(prompt_v), _p(prompt_bias), _p(prompt_of_row), _p(k), _p(v), _p(new_k), _p(new_v),
        _p(out), new_v.stride(0), prompt_len, pcols, cols, width, n, kv_heads, heads // kv_heads, hd)
    return out


def sample(logits: Tensor, temperature: float, u: Tensor, banned: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """Tokens (n,) from softmax(logits / temperature) (n, V; float32 or bfloat16, read as float32) with `banned`
    token ids' weights zeroed, the inverse of each row's cumulative distribution at u (n, 1) float64 in (0, 1];
    and their log-probs under the unbanned distribution. None where some row has no weight left once the banned
    tokens are removed."""
    _contiguous(logits, u)
    n, v = logits.shape
    banned = None if banned is None else banned.to(torch.int64).contiguous()
    tokens, logps = torch.empty(n, dtype=torch.int64), torch.empty(n)
    _variant("lr_sample", logits)(_p(logits), n, v, temperature, _p(u), _p(banned),
                                  0 if banned is None else banned.numel(), _p(tokens), _p(logps))
    return None if bool((tokens < 0).any()) else (tokens, logps)
