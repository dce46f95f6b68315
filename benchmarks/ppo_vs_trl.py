"""PPO step time and peak memory: lightning_rlhf against TRL 1.12's `trl.experimental.ppo.PPOTrainer`.

    python -m venv .venv-trl112 && .venv-trl112/bin/pip install torch==2.13.0 "trl==1.12.0"   # TRL's own env
    python benchmarks/ppo_vs_trl.py --model checkpoints/smollm2-135m-instruct --repeats 2

The same policy, prompts, forced response length, KL coefficient (k1 in the reward on both sides), number of
PPO epochs (one mini-batch each) and AdamW at lr 1e-6; the reward model and the critic both start from a
reward model with a fresh head on the policy's body (written once next to --model, or --reward-model). One
sample per prompt. Everything else as benchmarks/grpo_vs_trl.py (alternating runs, warm-up dropped, medians).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_vs_trl import main  # noqa: E402

if __name__ == "__main__":
    main(algo="ppo", trl_python=".venv-trl112/bin/python", doc=__doc__)
