"""Entry point: `python -m lightning_rlhf <subcommand> ...` (see `lightning_rlhf.cli`)."""

from lightning_rlhf.cli import main

if __name__ == "__main__":
    main()
