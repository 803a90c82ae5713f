"""Name -> class registries for the extension points (strategies, fitness tasks, merge methods).

Registering by name keeps configs declarative; refusing duplicates stops two plugins from
silently shadowing each other.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, autoload: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._autoload = autoload
        self._loaded = autoload is None

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} name {name!r} must be alphanumeric (with - or _)")
        if name in self._items and self._items[name] is not obj:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered "
                f"({_describe(self._items[name])}); pick another name"
            )
        self._items[name] = obj

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._autoload is not None
            self._autoload()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def get(self, name: str) -> T:
        """Look up a name, or import `package.module:attr` for plugins that live outside the repo."""
        self._ensure_loaded()
        if name in self._items:
            return self._items[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise KeyError(f"cannot import {self.kind} {name!r}: {exc}") from exc
        raise KeyError(
            f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or '(none)'}"
            f" (or give 'package.module:ClassName')"
        )

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._items


def _describe(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
