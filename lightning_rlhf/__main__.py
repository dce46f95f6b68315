"""Entry point: `python -m lightning_rlhf <subcommand> ...` runs `lightning_rlhf.cli.main`.

Simplification: nothing but the call; the `lightning-rlhf` console script runs the same `main`.
"""

from lightning_rlhf.cli import main

if __name__ == "__main__":
    main()
