"""lightning_rlhf: post-training language models with RL on PyTorch Lightning.

Stages (LightningModules in `lightning_rlhf.algorithms`): SFT, RewardModel, GRPO, PPO.
Math lives in `lightning_rlhf.functional` as pure tensor functions.
"""

__version__ = "0.1.0"
