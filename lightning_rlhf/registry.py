"""A tiny name -> object registry used for every variant chosen by name in YAML.

A typo gets an error that lists the valid names (verl's `register_adv_est` idea), instead of
if/elif chains spread through the trainers. Each registry instance lives in a leaf module of its package
(e.g. `rewards/registry.py`), so implementations can register into it without import cycles.

Simplifications: names are plain strings, registered once per process (a second registration of a name
is an error); there is no unregistering and no plugin discovery (a module registers when imported).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator


class Registry:
    """Maps names to objects. `kind` names what is registered, for error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: `@REG.register("name")` stores the decorated object under `name`."""

        def deco(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        """Return the object registered as `name`; a ValueError lists the valid names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items))
            from lightning_rlhf.errors import ConfigError

            raise ConfigError(f"unknown {self.kind} '{name}'. Valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
