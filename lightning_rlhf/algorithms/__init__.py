"""One LightningModule per stage: SFT, RewardModel (Bradley-Terry), GRPO, PPO.

`Stage` (stage.py) is their base (validation lifecycle, optimizer and schedule, export); `RLStage`
(rl_stage.py) adds what GRPO and PPO share; the option groups of the RL stages are in options.py.
"""

from lightning_rlhf.algorithms.grpo import GRPO
from lightning_rlhf.algorithms.options import (
    AdvantageOptions, CriticOptions, LossOptions, OptimOptions, RolloutOptions,
)
from lightning_rlhf.algorithms.ppo import PPO
from lightning_rlhf.algorithms.reward_model import RewardModel
from lightning_rlhf.algorithms.rl_stage import RLStage
from lightning_rlhf.algorithms.sft import SFT
from lightning_rlhf.algorithms.stage import Stage

__all__ = ["SFT", "RewardModel", "GRPO", "PPO", "Stage", "RLStage", "RolloutOptions", "AdvantageOptions",
           "LossOptions", "OptimOptions", "CriticOptions"]
