"""Reward functions chosen by name, and the weighted combination the RL stages call.

Every reward has the signature `(prompts: list[str], completions: list[str], **columns) -> list[float]`,
where `columns` are extra dataset columns aligned with the completions (e.g. `answer=[...]`); a reward
ignores the columns it does not use. Rewards that need settings are classes: `__init__` takes the
settings, `__call__` has the signature above.

Registered names (`REWARDS.names()`): `accuracy`, `format`, `language`, `countdown`, `arithmetic_steps`,
`reward_model`. YAML picks them through `CombinedReward` (see `compose.py`):

    rewards: {accuracy: 1.0, format: 0.5}
    rewards: [{name: accuracy, weight: 1.0}, {name: reward_model, weight: 1.0, path: ckpt/rm}]

`REWARDS` lives in the leaf module `registry.py`; importing this package imports every module that
registers into it, so the registry is complete. Simplification: the registry is process-global; a
custom reward is added with `@REWARDS.register("my_reward")` before the config is parsed.
"""

from lightning_rlhf.rewards import arithmetic  # noqa: F401  (registers arithmetic_steps)
from lightning_rlhf.rewards.compose import (
    CombinedReward,
    RewardOutput,
    RewardSpec,
    build_reward,
    parse_reward_specs,
)
from lightning_rlhf.rewards.registry import REWARDS
from lightning_rlhf.rewards.reward_model import RewardModelScorer
from lightning_rlhf.rewards.rules import (
    AccuracyReward,
    LanguageConsistency,
    accuracy_reward,
    countdown_reward,
    extract_answer,
    format_reward,
    language_shares,
)

__all__ = [
    "REWARDS",
    "AccuracyReward",
    "CombinedReward",
    "LanguageConsistency",
    "RewardModelScorer",
    "RewardOutput",
    "RewardSpec",
    "accuracy_reward",
    "build_reward",
    "countdown_reward",
    "extract_answer",
    "format_reward",
    "language_shares",
    "parse_reward_specs",
]
