"""Rollout engines: sample responses for prompts, returning tokens, masks and sampling logprobs.

`ROLLOUT_ENGINES.get(name)()` builds an engine by name ("hf": Hugging Face `generate`);
`engine.generate(model, ids, mask, **sampling)` takes `SamplingParams`' fields as keywords;
`sequence_logprobs` recomputes the same logprobs teacher-forced (policy and reference scoring).
`ROLLOUT_ENGINES` lives in the leaf `base.py`; importing this package imports the engines, which register
into it: "hf" (any model, `generate`) and "static" (Llama-family models: static KV cache, lean decode loop;
other models fall back to "hf"). `use_fused_training_ops(model)`: a small float32 model's RMSNorm and SiLU MLP
trained through fused CPU kernels (`train_ops.py`).
"""

from lightning_rlhf.rollout.base import ROLLOUT_ENGINES, Rollout, RolloutEngine, SamplingParams
from lightning_rlhf.rollout.hf import HFGenerateEngine
from lightning_rlhf.rollout.static import StaticCacheEngine
from lightning_rlhf.rollout.teacher_forcing import sequence_logprobs
from lightning_rlhf.rollout.train_ops import use_fused_training_ops

__all__ = ["ROLLOUT_ENGINES", "HFGenerateEngine", "StaticCacheEngine", "Rollout", "RolloutEngine", "SamplingParams", "sequence_logprobs",
           "use_fused_training_ops"]
