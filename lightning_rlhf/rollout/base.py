"""The rollout contract: what a generation engine returns (`Rollout`) and the engine interface.

A `Rollout` holds N = num_prompts * group_size sampled responses with everything the trainers need:
left-padded prompts, right-padded responses, the response mask (1 on real tokens, the eos token
included), the log-probs of the sampled tokens under the sampling distribution, and truncation flags.
Rows of one prompt are consecutive: rows i*G .. i*G+G-1 all answer prompt i (GRPO's group advantages
rely on that).

An engine (`RolloutEngine`) turns a batch of prompts into a `Rollout`, sampling as `SamplingParams`
says (checked once, in `RolloutEngine.generate`). Engines are chosen by name from `ROLLOUT_ENGINES`
("hf" = Hugging Face `generate`, in `hf.py`). A leaf module: it imports only `lightning_rlhf.registry`.

Simplifications: a `Rollout` is a plain container of tensors; it carries no text, rewards or
advantages (trainers keep those next to it), and `select`/`split` keep the rows in the order given.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_rlhf.registry import Registry

ROLLOUT_ENGINES = Registry("rollout engine")


@dataclass
class Rollout:
    """N sampled responses to N/group_size prompts, each prompt repeated group_size times in a row.

    prompt_ids (N, P) long, left-padded; prompt_mask (N, P) 1 on real prompt tokens;
    response_ids (N, T) long, right-padded with the pad id after the first eos;
    response_mask (N, T) float, 1 on real response tokens including a generated eos;
    logprobs (N, T) float32, log-prob of each sampled token under the sampling distribution, 0 at padding;
    truncated (N,) bool, True where no eos was generated within max_new_tokens;
    group_size: G, the number of consecutive rows sampled from the same prompt.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    truncated: Tensor
    group_size: int = 1

    def __post_init__(self) -> None:
        n, p = self.prompt_ids.shape
        t = self.response_ids.shape[1]
        expected = {
            "prompt_mask": (n, p),
            "response_ids": (n, t),
            "response_mask": (n, t),
            "logprobs": (n, t),
            "truncated": (n,),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"Rollout.{name} has shape {got}, expected {shape} (prompt_ids is {(n, p)}, "
                    f"response_ids has {t} columns); build all fields from the same batch"
                )
        if self.group_size < 1 or n % self.group_size != 0:
            raise ValueError(
                f"Rollout.group_size={self.group_size} must be >= 1 and divide the number of rows ({n}); "
                "pass group_size=1 when the rows are not whole groups"
            )

    # ----- derived tensors -------------------------------------------------------------------------
    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0] // self.group_size

    @property
    def input_ids(self) -> Tensor:
        """(N, P+T): prompt and response concatenated (left padding, then right padding)."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(N, P+T) long: prompt_mask then response_mask."""
        return torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)

    @property
    def position_ids(self) -> Tensor:
        """(N, P+T): cumsum(attention_mask) - 1, clamped at 0, so the first real token is position 0."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    @property
    def response_lengths(self) -> Tensor:
        """(N,) long: number of real response tokens (eos included)."""
        return self.response_mask.sum(dim=1).long()

    @property
    def num_tokens(self) -> int:
        """Total real response tokens in the rollout."""
        return int(self.response_mask.sum().item())

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    # ----- moving and slicing ----------------------------------------------------------------------
    def _tensor_fields(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor moved to `device`."""
        return replace(self, **{name: getattr(self, name).to(device) for name in self._tensor_fields()})

    def select(self, idx: Tensor | Sequence[int] | slice, group_size: int = 1) -> Rollout:
        """Rows `idx` (indices, bool mask or slice) as a new Rollout.

        Arbitrary rows are not whole groups in general, so the result has group_size=1 unless the
        caller passes the group size it knows the selection keeps.
        """
        if not isinstance(idx, (slice, Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        if isinstance(idx, Tensor):
            idx = idx.to(self.prompt_ids.device)
        return replace(
            self, group_size=group_size, **{name: getattr(self, name)[idx] for name in self._tensor_fields()}
        )

    def split(self, minibatch_size: int) -> list[Rollout]:
        """Consecutive minibatches of `minibatch_size` rows (the last may be smaller), in order.

        A minibatch keeps group_size when minibatch_size is a multiple of it (whole groups), else 1.
        """
        if minibatch_size < 1:
            raise ValueError(f"minibatch_size must be >= 1, got {minibatch_size}")
        keep = self.group_size if minibatch_size % self.group_size == 0 else 1
        n = len(self)
        return [self.select(slice(s, min(s + minibatch_size, n)), group_size=keep) for s in range(0, n, minibatch_size)]

    def decode(self, tokenizer: Any) -> list[str]:
        """Response texts: the real response tokens of each row, decoded without special tokens."""
        ids = [row[mask > 0].tolist() for row, mask in zip(self.response_ids.cpu(), self.response_mask.cpu())]
        return tokenizer.batch_decode(ids, skip_special_tokens=True)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample: the keyword arguments of `RolloutEngine.generate`, all checked in one place.

    `num_generations` responses per prompt (consecutive rows), at most `max_new_tokens` each. top_k=0
    and top_p=1.0 disable those filters; greedy=True takes the argmax (temperature, top_p, top_k
    ignored; logprobs at temperature 1). `eos_token_id` (one id or several) and `pad_token_id` are
    required. `prompt_keys` ((B,) int64, see `keyed.py`) makes each response's random numbers a function of
    its key instead of torch's generator; only engines that say so (`supports_keys`) accept them.
    """

    eos_token_id: int | Sequence[int] | None
    pad_token_id: int | None
    num_generations: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0
    prompt_keys: Tensor | None = None

    @property
    def eos_ids(self) -> list[int]:
        """`eos_token_id` as a list of ids."""
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


class RolloutEngine(abc.ABC):
    """Samples responses for a batch of left-padded prompts and returns a `Rollout`.

    `generate` checks the arguments once; an engine implements `_generate`, which gets them checked. An
    engine's constructor takes its settings (`rollout.engine_kwargs`) and, when `rollout.dtype` is set, the
    sampling precision as `dtype` ("float32", "bfloat16", "float16"). An engine that samples with
    `prompt_keys` (keyed sampling) sets `supports_keys = True`.
    """

    supports_keys = False

    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        params: SamplingParams | None = None,
        **sampling: Any,
    ) -> Rollout:
        """Sample `num_generations` responses per prompt (consecutive rows), at most max_new_tokens each.

        prompt_ids/prompt_mask: (B, P), left-padded. The sampling settings are `SamplingParams`' fields
        given as keywords (`engine.generate(model, ids, mask, num_generations=4, max_new_tokens=32,
        temperature=1.0, eos_token_id=eos, pad_token_id=pad)`), or a `params` object (keywords given
        beside it override its fields). Returns a Rollout with N = B * num_generations rows and
        group_size = num_generations. Autocast is off inside (a stage's bf16-mixed training wraps its steps in
        it): the engine's own `dtype` setting is the sampling precision.
        """
        params = SamplingParams(**sampling) if params is None else replace(params, **sampling)
        check_generate_args(prompt_ids, prompt_mask, params)
        if params.prompt_keys is not None and not self.supports_keys:
            raise ValueError(f"{type(self).__name__} cannot sample with prompt_keys (rollout.sampling_seed): "
                             "use the 'static' engine, or set rollout.sampling_seed to null")
        with torch.autocast(prompt_ids.device.type, enabled=False):
            return self._generate(model, prompt_ids, prompt_mask, params)

    @abc.abstractmethod
    def _generate(self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                  params: SamplingParams) -> Rollout:
        """The engine's sampling, with arguments `generate` has already checked."""


def check_generate_args(prompt_ids: Tensor, prompt_mask: Tensor, params: SamplingParams) -> None:
    """Raise a ValueError naming the bad argument and the fix; `RolloutEngine.generate` calls it."""
    if prompt_ids.dim() != 2 or prompt_ids.dtype.is_floating_point:
        raise ValueError(
            f"prompt_ids must be a 2-D integer tensor (B, P), got shape {tuple(prompt_ids.shape)} "
            f"dtype {prompt_ids.dtype}"
        )
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}"
        )
    if params.prompt_keys is not None and tuple(params.prompt_keys.shape) != (prompt_ids.shape[0],):
        raise ValueError(f"prompt_keys must have one key per prompt, shape ({prompt_ids.shape[0]},), got "
                         f"{tuple(params.prompt_keys.shape)}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids is empty (shape {tuple(prompt_ids.shape)}); pass at least one token")
    if not bool((prompt_mask[:, -1] != 0).all()):
        raise ValueError(
            "prompts must be left-padded (the last column of prompt_mask must be all 1): "
            "set tokenizer.padding_side = 'left' before tokenizing prompts"
        )
    _check_sampling(params)


def _check_sampling(p: SamplingParams) -> None:
    if p.num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {p.num_generations}")
    if p.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
    if not 0 <= p.min_new_tokens <= p.max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={p.max_new_tokens}], got {p.min_new_tokens}")
    if not p.greedy:
        if not p.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {p.temperature}; use greedy=True for argmax")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p.top_p} (1.0 disables it)")
        if p.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {p.top_k} (0 disables it)")
    if p.eos_token_id is None or p.pad_token_id is None:
        raise ValueError(
            f"eos_token_id={p.eos_token_id} and pad_token_id={p.pad_token_id} must both be set: give the "
            "tokenizer an eos_token and a pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )


def response_mask_from_eos(tokens: Tensor, eos_token_id: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """(N, T) tokens -> (mask, truncated): mask is 1 up to and including the first eos, 0 after;
    truncated (N,) is True for rows with no eos. Works when pad == eos (counts the first one only)."""
    eos = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=tokens.device
    )
    is_eos = torch.isin(tokens, eos)
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # number of eos strictly before t
    mask = eos_before == 0
    return mask, ~is_eos.any(dim=1)
