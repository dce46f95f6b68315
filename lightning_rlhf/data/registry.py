"""The data registries: `TASKS` (seeded row generators) and `FORMATTERS` (row transforms named in YAML).

A leaf module: it imports nothing from the package but `lightning_rlhf.registry`, so the generators
(`tasks.py`, `countdown.py`) and formatters (`sources.py`) register into it and `sources.py` looks names
up in it without importing one another; `lightning_rlhf.data` imports them all, so both are complete.

Simplification: the registries are process-global; a custom task or format is added with
`@TASKS.register("name")` / `@FORMATTERS.register("name")` before the config is parsed.
"""

from lightning_rlhf.registry import Registry

TASKS = Registry("task")
FORMATTERS = Registry("format")
