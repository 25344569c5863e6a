"""key=value arguments of the checkpoint tools (sample, evaluate, recall), and their one-line
errors.

Imports nothing heavy (no torch, Hydra or Lightning): a tool parses its arguments, and answers
--help or a typo, before it loads torch, so `python -m seqtrain.sample --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from seqtrain.errors import ConfigError, plugin_error


def key_help(schema: type, passthrough: tuple[str, ...], doc: str) -> str:
    """--help of a checkpoint tool: its docstring, then each key with its default and the
    comment it has in the dataclass (the source is the one place they are written)."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(schema), re.M))
    lines = [doc.strip(), "", "Arguments are KEY=VALUE:"]
    for f in dataclasses.fields(schema):
        default = f.default
        if default is MISSING:
            default = "... (required)"
        elif default is None:
            default = "null"
        elif isinstance(default, str):
            default = repr(default)
        lines.append(f"  {f.name}={default}".ljust(24) + f"  {comments.get(f.name, '')}")
    for prefix in passthrough:
        lines.append(f"  {prefix}.KEY=VALUE".ljust(24) + "  overrides the checkpoint's config")
    return "\n".join(lines)


def parse_key_values(
    argv: list[str], schema: type, passthrough: tuple[str, ...] = (), doc: str = ""
) -> tuple:
    """key=value arguments checked against a dataclass, as training takes Hydra's. Keys under a
    `passthrough` prefix (e.g. `model.`) are returned as config overrides. Values stay verbatim,
    so prompt="def " keeps its space. --help (-h) prints `doc` and the keys, and exits."""
    if "--help" in argv or "-h" in argv:
        print(key_help(schema, passthrough, doc))
        sys.exit(0)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    known, overrides = {}, {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"{arg!r}: arguments are key=value; keys: {', '.join(fields)}")
        if key.split(".")[0] in passthrough:
            overrides[key] = value
        elif key in fields:
            known[key] = None if value in ("null", "None") else value
        else:
            allowed = ", ".join([*fields, *(f"{p}.*" for p in passthrough)])
            raise ConfigError(f"{key} is not a key; this command takes: {allowed}")
    try:
        args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), known))
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required: {err.full_key}=...") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}") from None
    return args, OmegaConf.to_container(
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()])
    )


def fail(message: str) -> NoReturn:
    """One line on stderr and exit 2, as training's errors (cli.fail); the traceback only when
    HYDRA_FULL_ERROR=1 asks for it. Called inside the `except` that caught the error."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"seqtrain: error: {message}", file=sys.stderr)
    sys.exit(2)


def plugin_failed(err: BaseException, say: Callable[[str], None] | None = None) -> None:
    """An error inside a user's plug-in code (`errors.plugin_error`): the line naming the key
    that named the plug-in (through `say`, else on stderr), then the plug-in's own frame, no frame
    of seqtrain, torch or Lightning, and exit status 1: the user's code failed, where 2 is seqtrain
    refusing its input. Any other error returns to be raised: a bug keeps its traceback, as does
    every error under HYDRA_FULL_ERROR=1."""
    text = plugin_error(err)
    if text is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    line, _, frame = text.partition("\n")
    if say is None:
        print(f"seqtrain: error: {line}", file=sys.stderr)
    else:
        say(f"seqtrain: error: {line}")
    print(frame, file=sys.stderr, flush=True)
    sys.exit(1)
