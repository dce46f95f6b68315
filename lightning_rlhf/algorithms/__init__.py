"""One LightningModule per stage. Imported lazily so `import lightning_rlhf.algorithms` stays light."""

from lightning_rlhf.algorithms.reward_model import RewardModel
from lightning_rlhf.algorithms.sft import SFT

from lightning_rlhf.algorithms.grpo import GRPO
from lightning_rlhf.algorithms.ppo import PPO

__all__ = ["SFT", "RewardModel", "GRPO"]
