"""`python tests/helpers/fit_with_test_rewards.py fit ...`: the CLI with test rewards registered first.

`digit_share` (the share of a completion's characters that are digits) varies on the random text of an
untrained tiny model, so advantages are not all zero; `distinct_share` (distinct characters per character)
varies in almost every group, for tests that need every step to train. Run as a script (not `-m`), Lightning's DDP launcher
starts the other ranks with this same script, so they register the reward too. `grpo_nan_on_call` is GRPO's
loss made NaN on chosen calls (the non-finite guard's test); `kill_callbacks` kill a run for the resume tests."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `kill_callbacks.KillAtStep` as a class_path

from lightning_rlhf.cli import main  # noqa: E402
from lightning_rlhf.functional import POLICY_LOSSES  # noqa: E402
from lightning_rlhf.rewards import REWARDS  # noqa: E402


@REWARDS.register("digit_share")
def digit_share(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@REWARDS.register("distinct_share")
def distinct_share(prompts, completions, **_):
    """Distinct characters per character: differs between almost any two samples, so every group has signal."""
    return [len(set(c)) / max(1, len(c)) for c in completions]


_loss_calls = 0


@POLICY_LOSSES.register("grpo_nan_on_call")
def grpo_nan_on_call(*args, **kwargs):
    """GRPO's loss, made NaN on the calls listed in $RLHF_TEST_NAN_CALLS ("2,5", or "from:3" for 3 and after)."""
    global _loss_calls
    _loss_calls += 1
    loss, stats = POLICY_LOSSES.get("grpo")(*args, **kwargs)
    calls = os.environ.get("RLHF_TEST_NAN_CALLS", "")
    bad = _loss_calls >= int(calls[5:]) if calls.startswith("from:") else str(_loss_calls) in calls.split(",")
    return (loss * float("nan") if bad else loss), stats


if __name__ == "__main__":
    main()
