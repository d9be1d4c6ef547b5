"""Name -> class registries for methods, models and data layouts, with close-match suggestions."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, TypeVar

from ssmis.errors import UserError

T = TypeVar("T")


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
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"Choose one of: {', '.join(sorted(self._items))}."
            raise UserError(where or self.kind, f"unknown {self.kind} {name!r}", hint)
        return self._items[name]

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items


METHODS: Registry = Registry("method")
MODELS: Registry = Registry("model")
LAYOUTS: Registry = Registry("layout")
