"""Name -> class registries for methods, models, data layouts and plug-ins, with close-match suggestions.

Third-party packages add their own by declaring an entry point in the `ssmis.extensions` group, e.g. in their
pyproject.toml `[project.entry-points."ssmis.extensions"] mymethod = "my_package.my_method"`; the module is
imported (and so registers itself) the first time a registry is consulted. An extension that fails to import is
an error naming it, never skipped."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, TypeVar

from ssmis.errors import UserError

T = TypeVar("T")
EXTENSION_GROUP = "ssmis.extensions"
_extensions_loaded = False


def load_extensions() -> None:
    """Import every `ssmis.extensions` entry point once (they register methods, models, layouts or plug-ins)."""
    global _extensions_loaded
    if _extensions_loaded:
        return
    _extensions_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=EXTENSION_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001  (any import failure of a third-party module)
            raise UserError(f"extension {ep.name!r} ({ep.value})", f"failed to import: {type(e).__name__}: {e}",
                            "Fix the extension package or uninstall it.") from e


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, where: str | None = None) -> T:
        load_extensions()
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"Choose one of: {', '.join(sorted(self._items))}."
            raise UserError(where or self.kind, f"unknown {self.kind} {name!r}", hint)
        return self._items[name]

    def list(self, pattern: str = "*") -> list[str]:
        load_extensions()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def name_of(self, obj) -> str | None:
        """The name `obj`'s class is registered under (the first in name order), or None."""
        return next((n for n in self.list() if self._items[n] is type(obj)), None)

    def __contains__(self, name: str) -> bool:
        load_extensions()
        return name in self._items


METHODS: Registry = Registry("method")
MODELS: Registry = Registry("model")
LAYOUTS: Registry = Registry("layout")
PLUGINS: Registry = Registry("plug-in")
