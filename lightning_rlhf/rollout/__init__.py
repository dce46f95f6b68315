"""Rollout engines: sample responses for prompts, returning tokens, masks and sampling logprobs.

`ROLLOUT_ENGINES.get(name)()` builds an engine by name ("hf": Hugging Face `generate`);
`engine.generate(model, ids, mask, **sampling)` takes `SamplingParams`' fields as keywords;
`sequence_logprobs` recomputes the same logprobs teacher-forced (policy and reference scoring).
`ROLLOUT_ENGINES` lives in the leaf `base.py`; importing this package imports `hf.py`, which registers
into it. Simplification: one engine ships ("hf"); a faster one is registered beside it.
"""

from lightning_rlhf.rollout.base import ROLLOUT_ENGINES, Rollout, RolloutEngine, SamplingParams
from lightning_rlhf.rollout.hf import HFGenerateEngine
from lightning_rlhf.rollout.teacher_forcing import sequence_logprobs

__all__ = ["ROLLOUT_ENGINES", "HFGenerateEngine", "Rollout", "RolloutEngine", "SamplingParams", "sequence_logprobs"]
