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

import argparse
import sys

from lightning_rlhf import commands  # noqa: F401  (importing it registers the extra subcommands)
from lightning_rlhf import export  # noqa: F401  (registers the export subcommand)
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
    except argparse.ArgumentError as e:  # a bad key or value in the config or on the command line
        print(f"error: {one_line_parse_error(str(e))}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a user error gets its message, not a traceback; anything else propagates
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


# lines of jsonargparse's nested report that say nothing about what is wrong
_PARSE_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                "Expected a <class 'NoneType'>", "Expected a path but")


def one_line_parse_error(message: str) -> str:
    """jsonargparse's multi-line report of a bad key or value as one line: the key, then the reasons (the
    value shown only when no reason names it), then where to look."""
    lines = [ln.strip().lstrip("-").strip() for ln in message.splitlines() if ln.strip().lstrip("-").strip()]
    head, details = lines[0], [ln for ln in lines[1:] if not ln.startswith(_PARSE_NOISE)]
    reasons = [ln for ln in details if not ln.startswith("Given value:")] or details
    text = " ".join([head, *reasons])
    return f"{text} (`fit --help` lists the keys; `fit --print_config --config ...` shows the resolved config)"
