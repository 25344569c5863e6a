"""`_target_` nodes of the config (optimizer, LR schedule, loggers, callbacks), checked and built.

A misspelt class path or an argument the class does not take would otherwise surface deep inside
training, after the run directory is written; `check` turns both into one line naming the key.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from hydra.utils import instantiate

from seqtrain.errors import ConfigError

TARGET = "_target_"
HYDRA_KEYS = (TARGET, "_partial_", "_args_", "_recursive_", "_convert_")


def locate(key: str, path: str) -> Any:
    """The object a dotted path names (module.attr.attr), or a ConfigError naming the key."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                # The module exists but one of its own imports does not.
                raise ConfigError(f"{key}._target_={path}: importing it failed: {err}") from None
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"{key}._target_={path}: no such class or function; give its import path")


def check(key: str, node: dict, given: tuple[str, ...] = ()) -> None:
    """The target exists and takes the node's arguments plus those seqtrain passes (`given`)."""
    if not isinstance(node, dict) or TARGET not in node:
        raise ConfigError(f"{key}: needs a {TARGET} (the class to build), e.g. {key}.{TARGET}=...")
    target = locate(key, node[TARGET])
    args = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        signature.bind_partial(**dict.fromkeys(given), **args)
    except TypeError:
        takes = [p for p in signature.parameters if p not in given and p not in ("self", "kwargs")]
        unknown = next((a for a in args if a not in signature.parameters), None)
        raise ConfigError(
            f"{key}.{unknown}: {node[TARGET]} takes no such argument; it takes: {', '.join(takes)}"
            if unknown
            else f"{key}: {node[TARGET]} cannot be called with {', '.join(args)}"
        ) from None


def build(node: dict, **given: Any) -> Any:
    """Instantiate a checked node; `given` are the arguments only the running job knows."""
    return instantiate(node, _convert_="all", **given)
