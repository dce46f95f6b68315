"""`REWARDS`: the registry of reward functions, chosen by name in YAML.

A leaf module: it imports nothing from the package but `lightning_rlhf.registry`, so the modules that
register rewards (`rules.py`, `arithmetic.py`, `reward_model.py`) and the one that looks them up
(`compose.py`) all import it from here, and `lightning_rlhf.rewards` imports them so they register.

Simplification: the registry is process-global; a custom reward is added with
`@REWARDS.register("my_reward")` before the config is parsed.
"""

from lightning_rlhf.registry import Registry

REWARDS = Registry("reward function")
