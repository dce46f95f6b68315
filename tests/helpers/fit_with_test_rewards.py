"""`python tests/helpers/fit_with_test_rewards.py fit ...`: the CLI with a test reward registered first.

`digit_share` (the share of a completion's characters that are digits) varies on the random text of an
untrained tiny model, so advantages are not all zero. Run as a script (not `-m`), Lightning's DDP launcher
starts the other ranks with this same script, so they register the reward too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_rlhf.cli import main  # noqa: E402
from lightning_rlhf.rewards import REWARDS  # noqa: E402


@REWARDS.register("digit_share")
def digit_share(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


if __name__ == "__main__":
    main()
