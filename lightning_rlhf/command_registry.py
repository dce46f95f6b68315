"""`COMMANDS`: the registry of extra subcommands (`make-tiny-model`, `quickstart`, ...) by name.

A leaf module: it imports only `lightning_rlhf.registry`, so `commands.py` registers into it and
`cli.main` dispatches from it. A command is `fn(argv: list[str])`. Simplification: commands are
process-global, registered when `lightning_rlhf.commands` is imported (which `cli.py` does).
"""

from lightning_rlhf.registry import Registry

COMMANDS = Registry("subcommand")
