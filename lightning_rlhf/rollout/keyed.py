"""Keyed sampling: the random numbers of a response are a function of what is sampled, not of the process.

With `rollout.sampling_seed` set, the uniform number that picks response token t of sample j of a prompt is

    u = splitmix64(key(seed, training step, prompt text) + j * K1 + t * K2) / 2**64     (in (0, 1])

instead of the next draw of torch's generator. So the same prompt at the same step gets the same G responses
whether it is sampled on one process or on rank 1 of 8, in a batch of 4 prompts or of 64, and after a resume
from a checkpoint: the property behind the "DDP equals one process" tests. The static engine draws one
uniform per row and token (it inverts the CDF), so the keys cost n integers per token.

Simplified: splitmix64 (Steele et al. 2014, the seeding generator of xoroshiro) is a good mixer, not a
cryptographic generator. Two copies of one prompt in the same step share their key, so they draw the same G
responses. Integer arithmetic wraps in int64, as torch's does; the right shifts are made logical by masking.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

_M1, _M2 = -4658895280553007687, -7723592293110705685   # 0xbf58476d1ce4e5b9, 0x94d049bb133111eb as int64
_GOLDEN = -7046029254386353131                          # 0x9e3779b97f4a7c15: splitmix64's increment
_POSITION = 0x2545F4914F6CDD1D                           # a second odd constant for the token position


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic on negative numbers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64's output function, element-wise on int64 (wrapping arithmetic)."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def prompt_keys(prompts: Sequence[str], seed: int, step: int) -> Tensor:
    """(B,) int64: a stable 64-bit key per prompt text, training step and seed (blake2b, not Python's
    per-process salted `hash`)."""
    def key(text: str) -> int:
        digest = hashlib.blake2b(f"{seed}\x00{step}\x00{text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)
    return torch.tensor([key(p) for p in prompts], dtype=torch.long)


def row_keys(keys: Tensor, group_size: int) -> Tensor:
    """(B,) prompt keys -> (B * G,) row keys: sample j of prompt i gets splitmix64(key_i + (j + 1) * golden)."""
    j = torch.arange(1, group_size + 1, dtype=torch.long, device=keys.device)
    return splitmix64(keys[:, None] + j[None, :] * _GOLDEN).reshape(-1)


def keyed_uniform(keys: Tensor, position: int) -> Tensor:
    """(n,) row keys and a token position -> (n, 1) float64 uniforms in (0, 1] (53 random bits each)."""
    bits = _shr(splitmix64(keys + torch.full_like(keys, position) * _POSITION), 11)
    return ((bits.double() + 1.0) / float(1 << 53))[:, None]
