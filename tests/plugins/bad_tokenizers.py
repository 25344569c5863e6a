"""Tokenizers with the mistakes a user's own can make, for tests/test_integrity.py: ids outside
the vocabulary they declare, ids that are not integers, and one slow enough to be interrupted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from seqtrain.tokenizers import Tokenizer


class Bytes(Tokenizer):
    """Byte tokens through the tokenize-and-cache path (not passthrough): a base for the others."""

    vocab_size = 256

    @classmethod
    def fit(cls, texts, cfg) -> Bytes:
        for _ in texts:
            pass
        return cls()

    @classmethod
    def from_state(cls, state: dict) -> Bytes:
        return cls()

    def state(self) -> dict:
        return {}

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


class Wraps(Bytes):
    """Declares 256 ids but gives byte + 44: a uint8 cache would wrap 300 to 44."""

    def encode(self, text: bytes) -> np.ndarray:
        return super().encode(text) + 44


class Floats(Bytes):
    """Gives its ids as floats."""

    def encode(self, text: bytes) -> np.ndarray:
        return super().encode(text).astype(np.float32)


class Unsaveable(Bytes):
    """Keeps a set in its state: no JSON for the cache or the checkpoint."""

    def state(self) -> dict:
        return {"seen": {"a", "b"}}


class NoEncode(Tokenizer):
    """Fits and saves itself, but cannot encode or decode."""

    vocab_size = 4

    @classmethod
    def fit(cls, texts, cfg) -> NoEncode:
        return cls()

    @classmethod
    def from_state(cls, state: dict) -> NoEncode:
        return cls()

    def state(self) -> dict:
        return {}


def a_function(text: bytes) -> list[int]:
    """A function where a class is wanted."""
    return list(text)


class Slow(Bytes):
    """Announces each block in $SLOW_MARK and takes a second over it: time to be interrupted."""

    def encode(self, text: bytes) -> np.ndarray:
        Path(os.environ["SLOW_MARK"]).touch()
        time.sleep(1.0)
        return super().encode(text)
