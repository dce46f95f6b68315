"""One LightningModule per stage: SFT, RewardModel (Bradley-Terry), GRPO, PPO."""

from lightning_rlhf.algorithms.grpo import GRPO
from lightning_rlhf.algorithms.ppo import PPO
from lightning_rlhf.algorithms.reward_model import RewardModel
from lightning_rlhf.algorithms.sft import SFT

__all__ = ["SFT", "RewardModel", "GRPO", "PPO"]
