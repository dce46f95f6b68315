"""The four name -> function registries of `lightning_rlhf.functional`, in a leaf module.

This module imports nothing from the package but `lightning_rlhf.registry.Registry`, so every module
that implements an entry can import its registry from here without an import cycle:

- `KL_ESTIMATORS`        "k1", "k2", "k3"                      filled by `functional/kl.py`;
- `LOSS_AGGREGATIONS`    "token-mean", "seq-mean-token-mean",
                         "seq-mean-token-sum-norm"             filled by `functional/losses.py`;
- `ADVANTAGE_ESTIMATORS` "gae", "grpo", "dr_grpo", "rloo",
                         "reinforce++_baseline"                filled by `functional/advantages.py`;
- `POLICY_LOSSES`        "grpo", "ppo_clip"                    filled by `functional/policy_losses.py`.

Importing `lightning_rlhf.functional` (which importing this module does first) fills all four. The
signature every entry of a registry shares is documented in the module that fills it and in
docs/math.md ("Registries"). A name that is not registered raises an error listing the valid names.
"""

from __future__ import annotations

from lightning_rlhf.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")
LOSS_AGGREGATIONS = Registry("loss aggregation")
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")

__all__ = ["ADVANTAGE_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES"]
