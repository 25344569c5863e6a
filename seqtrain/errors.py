"""The errors a user can cause, under one base class that every tool catches.

A leaf module (it imports nothing from seqtrain), so any layer may raise these. `str()` of each is
the one line shown to the user; the command-line tools print it and exit 2, no traceback.
"""

from __future__ import annotations


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
