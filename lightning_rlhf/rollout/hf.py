"""Rollouts with Hugging Face `generate` (registered as "hf"): simple, works for any HF causal LM.

Each prompt is repeated num_generations times in consecutive rows, `model.generate` samples with a KV
cache, and the log-prob of every sampled token is taken from the RAW logits that generate returns
(`output_logits=True`), as log_softmax(logits / temperature) gathered at the token (temperature 1 for
greedy) -- captured while sampling, no second forward pass.

The logprob choice: it is the log-prob under the temperature-scaled distribution WITHOUT top-p/top-k
truncation (as TRL and verl do), so it equals a teacher-forced forward with logits / temperature
(`sequence_logprobs`). With top_p < 1 or top_k > 0 the tokens are sampled from the truncated
distribution, so these logprobs are those of the untruncated one the trainer optimises.

Generation settings are exactly the ones passed in: during the call the model's own
`generation_config` (from a checkpoint's generation_config.json: repetition_penalty, min_p,
min_new_tokens, ...) is swapped for a blank one and restored after, because any logits processor
not reflected in the logprobs would make the rollout silently off-policy. An explicit
GenerationConfig also keeps transformers from warning about sampling flags when greedy.

Simplifications: generate keeps all raw logits (rows x steps x vocab float32) until it returns; bound
that with `max_batch_size` (rows per generate call). Finished rows still cost compute until the
longest row ends (no continuous batching); a faster engine can be registered beside this one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor
from transformers import GenerationConfig

from lightning_rlhf.functional import logprobs_from_logits
from lightning_rlhf.rollout.base import ROLLOUT_ENGINES, Rollout, RolloutEngine, SamplingParams, response_mask_from_eos


@contextlib.contextmanager
def _generation_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() + no_grad + a blank model.generation_config for the duration; restores all three."""
    was_training = model.training
    saved_config = getattr(model, "generation_config", None)
    model.eval()
    if saved_config is not None:
        model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            yield
    finally:
        if saved_config is not None:
            model.generation_config = saved_config
        model.train(was_training)


def _right_pad(x: Tensor, width: int, value: float | int) -> Tensor:
    """Pad (N, T) on the right to (N, width) with `value`."""
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([x, pad], dim=1)


@ROLLOUT_ENGINES.register("hf")
class HFGenerateEngine(RolloutEngine):
    """Rollouts with `model.generate`; max_batch_size caps the rows per generate call (None: all)."""

    def __init__(self, max_batch_size: int | None = None, dtype: str | None = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.dtype = None if dtype is None else getattr(torch, dtype)  # sampled under autocast to it

    def _generate(self, model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                  params: SamplingParams) -> Rollout:
        if not hasattr(model, "generate"):
            raise TypeError(
                f"{type(model).__name__} has no .generate(): pass the Hugging Face causal LM itself "
                "(unwrap DDP/FSDP/LightningModule wrappers first)"
            )
        eos_list, pad_token_id, g = params.eos_ids, params.pad_token_id, params.num_generations
        temperature = 1.0 if params.greedy else float(params.temperature)
        config = self._generation_config(params, temperature, eos_list)
        ids = prompt_ids.repeat_interleave(g, dim=0)
        mask = prompt_mask.long().repeat_interleave(g, dim=0)
        step = self.max_batch_size or ids.shape[0]
        chunks = []
        cast = self.dtype is not None and self.dtype != next(model.parameters()).dtype
        device = next(model.parameters()).device.type
        with _generation_mode(model), torch.autocast(device, dtype=self.dtype, enabled=cast):
            for s in range(0, ids.shape[0], step):
                chunks.append(self._generate_chunk(model, ids[s : s + step], mask[s : s + step], config, temperature))
        width = max(c[0].shape[1] for c in chunks)
        tokens = torch.cat([_right_pad(c[0], width, pad_token_id) for c in chunks])
        logprobs = torch.cat([_right_pad(c[1], width, 0.0) for c in chunks])
        real, truncated = response_mask_from_eos(tokens, eos_list)
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            response_ids=torch.where(real, tokens, pad_token_id),
            response_mask=real.float(),
            logprobs=torch.where(real, logprobs, 0.0),  # where, not *: padding logprobs may be -inf
            truncated=truncated,
            group_size=g,
        )

    @staticmethod
    def _generation_config(params: SamplingParams, temperature: float, eos: list[int]) -> GenerationConfig:
        common = dict(max_new_tokens=params.max_new_tokens, eos_token_id=eos, pad_token_id=params.pad_token_id,
                      return_dict_in_generate=True, output_logits=True, use_cache=True, num_beams=1)
        if params.min_new_tokens:
            common["min_new_tokens"] = params.min_new_tokens
        if params.greedy:  # leave the sampling flags unset: transformers warns about them when do_sample=False
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=temperature, top_p=params.top_p, top_k=params.top_k,
                                **common)

    @staticmethod
    def _generate_chunk(
        model: torch.nn.Module, ids: Tensor, mask: Tensor, config: GenerationConfig, temperature: float
    ) -> tuple[Tensor, Tensor]:
        """One generate call -> (tokens (n, t), logprobs (n, t)) with t <= max_new_tokens steps."""
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        tokens = out.sequences[:, ids.shape[1] :]
        if len(out.logits) != tokens.shape[1]:
            raise RuntimeError(
                f"generate returned {len(out.logits)} logit steps for {tokens.shape[1]} new tokens; "
                "this transformers version is not supported by the 'hf' rollout engine"
            )
        # Raw logits (before any logits processor), one (n, V) step at a time to avoid a stacked copy.
        steps = [
            logprobs_from_logits(step.float().unsqueeze(1) / temperature, tokens[:, i : i + 1])
            for i, step in enumerate(out.logits)
        ]
        return tokens, torch.cat(steps, dim=1)
