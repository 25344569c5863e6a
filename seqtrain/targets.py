"""`_target_` nodes of the config (optimizer, LR schedule, loggers, callbacks), checked and built.

A misspelt class path or an argument the class does not take would otherwise surface deep inside
training, after the run directory is written; `check` turns both into one line naming the key.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from hydra.utils import instantiate

from seqtrain.errors import ConfigError, SeqtrainError, first_line, named_plugin

TARGET = "_target_"
HYDRA_KEYS = (TARGET, "_partial_", "_args_", "_recursive_", "_convert_")


def locate(key: str, path: str) -> Any:
    """The object a dotted path names (module.attr.attr), or a ConfigError naming the key; a
    user's module is remembered as the key's plug-in (an error raised in it names the key)."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                # The module exists but one of its own imports does not.
                raise ConfigError(f"{key}._target_={path}: importing it failed: {err}") from None
            continue
        except Exception:  # its own code failed on import: that error, its frame and the key
            named_plugin(module_name, ".".join(parts[split:]), f"{key}._target_", path)
            raise
        obj: Any = module
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        if split < len(parts):
            named_plugin(module, ".".join(parts[split:]), f"{key}._target_", path)
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


def call(key: str, node: dict, *args: Any, **given: Any) -> Any:
    """Build a checked `_partial_` node and call it with what seqtrain passes (the optimizer's
    parameters, the schedule's optimizer). An argument value the target refuses (its own
    ValueError or TypeError: AdamW's betas out of [0, 1)) is one line naming the key, found in
    the message where it names the argument, and the target."""
    if node.get("_partial_") is not True:
        raise ConfigError(
            f"{key}._partial_: must be true (seqtrain calls {node[TARGET]} with what only the run "
            f"knows); add +{key}._partial_=true"
        )
    try:
        return build(node)(*args, **given)
    except SeqtrainError:
        raise
    except (ValueError, TypeError) as err:
        words = str(err).lower()
        args_ = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
        named = [k for k in args_ if k.lower() in words or k.lower().rstrip("s") in words]
        where = f"{key}.{named[0]}={args_[named[0]]}" if named else key
        raise ConfigError(f"{where}: {node[TARGET]}: {first_line(err)}") from None
