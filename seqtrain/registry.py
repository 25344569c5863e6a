"""Name -> implementation tables: one per kind of plug-in (cell, task, corpus source, ...).

Built-ins register by name with a decorator; a user's own implementation is named by import path,
`package.module:Name`, found on sys.path (PYTHONPATH), so nothing in seqtrain is edited to extend
it. A name that is neither is a one-line ConfigError that names the config key and the choices.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from seqtrain.errors import ConfigError, named_plugin

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    """'my_cells:MyCell' names a user's object; a bare word names a registered built-in."""
    module, colon, attr = name.partition(":")
    return bool(colon and module and attr)


def import_object(path: str, key: str) -> object:
    """The object at 'package.module:Name'; a missing module or name is one line naming `key`.
    The module is remembered as `key`'s plug-in: an error raised in its code names the key."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}={path}: cannot import module '{module_name}' ({err}); is it on PYTHONPATH?"
        ) from None
    except Exception:  # its own code failed on import: that error, its frame and the key
        named_plugin(module_name, attr, key, path)
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={path}: module '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    named_plugin(module, attr, key, path)
    return obj


class Registry(Generic[T]):
    """Built-ins by name, plus any `module:Name` import path."""

    def __init__(self, key: str) -> None:
        self.key = key  # the config key that selects from this table, for error messages
        self._table: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._table:
                raise ValueError(f"{self.key}: '{name}' is registered twice")
            self._table[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return list(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table or (isinstance(name, str) and is_import_path(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def get(self, name: str) -> T:
        if name in self._table:
            return self._table[name]
        if is_import_path(name):
            return import_object(name, self.key)  # type: ignore[return-value]
        raise ConfigError(
            f"{self.key}={name}: no such option; choose from {', '.join(self._table)}, "
            "or name your own as module:Name"
        )
