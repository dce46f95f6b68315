"""Command line: LightningCLI's `fit/validate/test/predict`, plus a few extra subcommands.

    python -m lightning_rlhf fit --config recipes/sft/tiny_arithmetic.yaml [--config more.yaml] [--trainer.max_steps 10]
    python -m lightning_rlhf make-tiny-model --out checkpoints/tiny-base
    python -m lightning_rlhf quickstart

`main` dispatches: a name in `COMMANDS` (registered by `commands.py`) runs that subcommand, anything
else goes to `RLHFCLI` (`lightning_cli.py`: config composition, CSV log, archived reruns). A user error
(`lightning_rlhf.errors.UserError`, wherever in the exception chain) prints one line `error: ...` and
exits with status 2. Simplification: the extra subcommands parse their own arguments with argparse;
`--help` lists them in one line before LightningCLI's help.
"""

from __future__ import annotations

import sys

from lightning_rlhf import commands  # noqa: F401  (importing it registers the extra subcommands)
from lightning_rlhf import pipeline  # noqa: F401  (registers the pipeline subcommand)
from lightning_rlhf.command_registry import COMMANDS
from lightning_rlhf.errors import find_user_error
from lightning_rlhf.lightning_cli import RLHFCLI, archive_previous_run  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> None:
    """Dispatch extra subcommands, else run the LightningCLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS.names():
            COMMANDS.get(args[0])(args[1:])
            return
        if args and args[0] in ("-h", "--help"):
            print("extra subcommands: " + ", ".join(COMMANDS.names()) + "  (each takes --help)\n")
        RLHFCLI(args=argv)  # None: LightningCLI reads sys.argv itself (no "both given" warning)
    except Exception as e:  # a user error gets its message, not a traceback; anything else propagates
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)
