"""The errors a user can cause, under one base class that every tool catches.

A leaf module (it imports nothing from seqtrain), so any layer may raise these. `str()` of each is
the one line shown to the user; the command-line tools print it and exit 2, no traceback.

An exception raised inside a user's own plug-in is not seqtrain's to explain: `plugin_error` says
which config key named the code that raised it and shows that code's frame, and nothing else.
"""

from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path
from types import ModuleType, TracebackType


class SeqtrainError(ValueError):
    """Bad input of any kind; the message is one line that says how to fix it."""


class ConfigError(SeqtrainError):
    """An invalid configuration or command-line argument."""


class DataError(SeqtrainError):
    """A bad corpus or data option."""


class CheckpointError(SeqtrainError):
    """A checkpoint that cannot be used."""


class NonFiniteError(SeqtrainError):
    """Training diverged: too many consecutive non-finite updates."""


POSITIVE = "must be a positive integer"


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """`key=value: allowed` as a ConfigError unless ok: the one line of every config check."""
    if not ok:
        raise ConfigError(f"{key}={value}: {allowed}")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's many-line one."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# A plug-in's module name -> (attribute, "KEY=PATH") for each object a config key named in it
# (registry.import_object, targets.locate), to say which key named code that raised.
PLUGINS: dict[str, list[tuple[str, str]]] = {}
# Where library code lives: a module under these (or seqtrain's own) is no plug-in.
_LIBRARIES = (
    *{Path(sysconfig.get_path(k)).resolve() for k in ("stdlib", "purelib", "platlib")},
    Path(__file__).resolve().parent,
)


def named_plugin(module: ModuleType | str, attr: str, key: str, path: str) -> None:
    """Remember that `key=path` named `attr` of `module`, unless the module is a library's
    (torch.optim.AdamW is named by a key too, but an error inside torch is not a plug-in's). A
    module given by name is one whose own code failed while it was imported."""
    if isinstance(module, ModuleType):
        file = getattr(module, "__file__", None)
        if file is None or any(Path(file).resolve().is_relative_to(lib) for lib in _LIBRARIES):
            return
        module = module.__name__
    named = PLUGINS.setdefault(module, [])
    if (attr, f"{key}={path}") not in named:
        named.append((attr, f"{key}={path}"))


def _plugin_key(tb: TracebackType) -> str | None:
    """The KEY=PATH that named the code of this frame, if it is a plug-in's."""
    named = PLUGINS.get(tb.tb_frame.f_globals.get("__name__", ""))
    if not named:
        return None
    qualname = tb.tb_frame.f_code.co_qualname
    own = [line for attr, line in named if qualname == attr or qualname.startswith(attr + ".")]
    return (own or [named[-1][1]])[0]


def plugin_error(err: BaseException) -> str | None:
    """`KEY=PATH raised Type: message` and the frame of the plug-in's own code that the error
    came from (the deepest of its frames: where it called torch wrongly, say), as Python prints a
    frame; None when no plug-in's code is in the traceback (nor in that of what caused it, as
    Hydra's instantiate wraps an error raised by a class it builds)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = None
        tb = err.__traceback__
        while tb is not None:
            key = _plugin_key(tb)
            if key is not None:
                found = (key, tb)
            tb = tb.tb_next
        if found is not None:
            key, tb = found
            frame = traceback.extract_tb(tb, limit=1).format()[0].rstrip("\n")
            text = str(err).strip().splitlines()
            message = f": {text[0]}" if text else ""
            return f"{key} raised {type(err).__name__}{message}\n{frame}"
        err = err.__cause__ or err.__context__
    return None
