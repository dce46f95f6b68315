"""A small float32 model's whole decode step in one kernel call (`decode_step.c`), for `LeanLlama`'s fused decode.

A small model's decode step costs little arithmetic and many calls: on 2 cores of an AMD EPYC (Zen 4), a
1M-parameter Llama (hidden 128, 4 layers) at 32 rows took 1.6-2.6 ms per step through the fused kernels of
`cpu_kernels.py` and torch's projections (about 40 calls, each a fork and join of the threads), against
0.72-0.85 ms for this one call (same process, alternating; float32 logits within 5e-7). The kernel's own GEMM
loses to oneDNN on large weights (SmolLM2-135M: 190 against 120 ms per step at 64 rows; a 35 MB model was even),
so the engine takes this path only for float32 models whose decoder and lm-head weights are at most
SMALL_STEP_BYTES.

`DecodeStep(layers, embed, norm, head, head_bias, heads, kv_heads, head_dim, eps)` copies the projections once,
transposed and stacked (q|k|v, gate|up) with their columns padded as the kernel reads them; calling it with one
step's tokens, rotary tables and a `SharedPromptKVCache` writes each new key and value into the cache and
returns the float32 logits (n, V). With `steps` > 1 it takes that many consecutive tokens per cache row, each
attending to the ones before it: a whole prompt (its left padding `masked`: `LeanLlama.prefill`) or a whole
response (the teacher-forced pass of `lean_scoring.py`) in one call.

Simplified: float32 only (a bfloat16 model keeps the per-operation kernels); the weights are copied, so the
step sees the model as it was when `LeanLlama` was built (as the rest of the engine does).
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from lightning_rlhf.rollout import cpu_kernels

SMALL_STEP_BYTES = 16 << 20  # float32 decoder + lm-head weights up to this size decode through `lr_decode_step`
_P, _I = ctypes.c_void_p, ctypes.c_int64
_LAYER_WEIGHTS = ("ln1", "qkv", "qkv_bias", "o", "o_bias", "ln2", "gate_up", "gate_up_bias", "down", "down_bias")
_SCRATCH = ("x", "h", "qkv", "q", "knew", "att", "tmp", "gu", "act")


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in (*_LAYER_WEIGHTS, "pk", "pv", "gk", "gv")]


class _Step(ctypes.Structure):
    _fields_ = ([(name, _I) for name in ("n", "D", "H", "Hk", "hd", "F", "V", "layers", "plen", "pcols", "cols",
                                         "width", "T")]
                + [("eps", ctypes.c_float)]
                + [(name, _P) for name in ("embed", "norm", "head", "head_bias", "pbias", "cos_", "sin_", "tokens",
                                           "prompt_of", "masked", "pos", *_SCRATCH, "logits", "layer")])


def pays(weight_bytes: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model with `weight_bytes` of decoder and lm-head weights decodes through `DecodeStep`: float32, on a
    CPU with the fused kernels built, and small (SMALL_STEP_BYTES)."""
    return (dtype == torch.float32 and device.type == "cpu" and weight_bytes <= SMALL_STEP_BYTES
            and cpu_kernels.kernels() is not None)


def _padded(parts: list[tuple[Tensor, Tensor | None]], columns: int) -> tuple[Tensor, Tensor | None]:
    """(weight (out, in), bias) pairs of projections that read one input -> their weights stacked and transposed,
    (in, sum of outs rounded up to `columns`) float32, each written straight into place (no stacked copy first),
    zero in the extra columns; the biases likewise (zeros for a missing one; None when all are missing)."""
    real = sum(w.shape[0] for w, _ in parts)
    out = -(-real // columns) * columns
    w = parts[0][0].new_empty(parts[0][0].shape[1], out, dtype=torch.float32)
    w[:, real:] = 0
    b = None if all(bias is None for _, bias in parts) else w.new_zeros(out)
    start = 0
    for weight, bias in parts:
        w[:, start:start + weight.shape[0]] = weight.t()
        if bias is not None:
            b[start:start + weight.shape[0]] = bias
        start += weight.shape[0]
    return w, b


def stack(parts: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) pairs of projections that read one input -> one projection: the weights stacked by rows,
    the biases likewise (zeros for a missing one; None when all are missing)."""
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStep:
    """See the module docstring. `layers`: per layer a dict of float32 tensors: ln1, ln2 (D,) and (weight, bias) pairs
    q, k, v, o, gate, up, down in torch's (out, in) layout, bias None where there is none."""

    def __init__(self, layers: list[dict], embed: Tensor, norm: Tensor, head: tuple[Tensor, Tensor | None],
                 heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        columns = cpu_kernels.kernels().lr_step_columns()
        self.keep: list[Tensor | None] = [embed.contiguous(), norm.contiguous()]  # alive as long as the pointers
        self.head = _padded([head], columns)
        self.layers = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            mats = {"qkv": [layer["q"], layer["k"], layer["v"]], "o": [layer["o"]],
                    "gate_up": [layer["gate"], layer["up"]], "down": [layer["down"]]}
            tensors = {"ln1": layer["ln1"].contiguous(), "ln2": layer["ln2"].contiguous()}
            for name, parts in mats.items():
                tensors[name], tensors[f"{name}_bias"] = _padded(parts, columns)
            self.keep += tensors.values()
            for name in _LAYER_WEIGHTS:
                setattr(self.layers[i], name, _ptr(tensors[name]))
        d, ffn = embed.shape[1], layers[0]["gate"][0].shape[0] if layers else 0
        self.sizes = {"x": d, "h": d, "qkv": (heads + 2 * kv_heads) * head_dim, "q": heads * head_dim,
                      "knew": kv_heads * head_dim, "att": heads * head_dim, "tmp": d, "gu": 2 * ffn, "act": ffn}
        self.step = _Step(D=d, H=heads, Hk=kv_heads, hd=head_dim, F=ffn, V=head[0].shape[0], layers=len(layers),
                          eps=eps, embed=_ptr(self.keep[0]), norm=_ptr(self.keep[1]), head=_ptr(self.head[0]),
                          head_bias=_ptr(self.head[1]), layer=ctypes.cast(self.layers, _P))
        self._scratch: tuple[int, dict[str, Tensor]] = (-1, {})

    def scratch(self, n: int) -> dict[str, Tensor]:
        """The step's working buffers for n rows, kept from the last call with as many."""
        if self._scratch[0] != n:
            self._scratch = (n, {name: torch.empty(n, size) for name, size in self.sizes.items()})
            for name, t in self._scratch[1].items():
                setattr(self.step, name, t.data_ptr())
        return self._scratch[1]

    def __call__(self, tokens: Tensor, cos: Tensor, sin: Tensor, cache, column: int, steps: int = 1,
                 masked: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Logits (n, V) float32 of one new token per row (tokens (n,) int64; cos, sin (n, heads + kv_heads, hd)
        float32 as `LeanLlama._rope_rows` gives them) written at `column` of `cache` (a `SharedPromptKVCache`).
        With `steps` > 1, `steps` consecutive tokens per cache row (rows i * steps ... (i + 1) * steps - 1 of tokens,
        cos, sin and the logits are cache row i's, at columns column ... column + steps - 1), each attending to
        the ones before it: a teacher-forced pass in one call. `masked` (cache rows,) int64: per cache row, how many
        leading generated columns are not attended (but by their own token): a left-padded prompt's padding when
        the prompt itself is run as generated tokens (`LeanLlama.prefill`). `positions` (n,) int64: cos and sin are
        tables by position (`LeanLlama.rope_table`), row i rotated by their row positions[i]; the caller makes the
        tables long enough (a token's position is at most its cache column)."""
        n = tokens.shape[0]
        pcols, cols = (cpu_kernels._cache_columns(*cache.prompt[0]), cpu_kernels._cache_columns(*cache.kv[0]))
        width = column - cache.prompt_width + 1
        if not 1 <= width <= cols - steps + 1 or tokens.dtype != torch.int64 or cos.dtype != torch.float32:
            raise ValueError(f"decode step: columns {column} .. {column + steps - 1} are outside the cache's "
                             f"{cache.prompt_width} + {cols} columns, or tokens {tokens.dtype} / cos {cos.dtype} are "
                             "not int64 / float32")
        if n != steps * cache.prompt_of_row.shape[0]:
            raise ValueError(f"decode step: {n} tokens for {cache.prompt_of_row.shape[0]} cache rows x {steps} steps")
        if masked is not None and (masked.dtype != torch.int64 or masked.shape != cache.prompt_of_row.shape):
            raise ValueError(f"decode step: masked must be int64 of shape {tuple(cache.prompt_of_row.shape)}, got "
                             f"{masked.dtype} {tuple(masked.shape)}")
        if positions is not None and (positions.dtype != torch.int64 or positions.shape != tokens.shape
                                      or cos.shape[0] < column + steps):
            raise ValueError(f"decode step: positions must be int64 of shape {tuple(tokens.shape)} into rope tables "
                             f"of at least {column + steps} positions, got {positions.dtype} "
                             f"{tuple(positions.shape)} and {cos.shape[0]}")
        cpu_kernels._contiguous(tokens, cos, sin, cache.prompt_of_row, cache.bias, masked, positions)
        self.scratch(n)
        logits = torch.empty(n, self.step.V)
        s = self.step
        s.n, s.plen, s.pcols, s.cols, s.width, s.T = n, cache.prompt_width, pcols, cols, width, steps
        s.pbias, s.cos_, s.sin_, s.tokens = _ptr(cache.bias), cos.data_ptr(), sin.data_ptr(), tokens.data_ptr()
        s.prompt_of, s.masked, s.pos = cache.prompt_of_row.data_ptr(), _ptr(masked), _ptr(positions)
        s.logits = logits.data_ptr()
        for layer, (pk, pv), (gk, gv) in zip(self.layers, cache.prompt, cache.kv):
            layer.pk, layer.pv, layer.gk, layer.gv = pk.data_ptr(), pv.data_ptr(), gk.data_ptr(), gv.data_ptr()
        cpu_kernels.kernels().lr_decode_step(ctypes.byref(s))
        return logits
