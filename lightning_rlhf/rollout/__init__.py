"""Rollout engines: sample responses for prompts, returning tokens, masks and sampling logprobs.

`ROLLOUT_ENGINES.get(name)()` builds an engine by name ("hf": Hugging Face `generate`);
`sequence_logprobs` recomputes the same logprobs teacher-forced (policy and reference scoring).
"""

from lightning_rlhf.rollout.base import ROLLOUT_ENGINES, Rollout, RolloutEngine
from lightning_rlhf.rollout.hf import HFGenerateEngine
from lightning_rlhf.rollout.teacher_forcing import sequence_logprobs

__all__ = ["ROLLOUT_ENGINES", "HFGenerateEngine", "Rollout", "RolloutEngine", "sequence_logprobs"]
