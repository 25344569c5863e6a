"""Reader plug-ins (data.reader=bad_readers:NAME) that return what a corpus is not, for
tests/test_integrity.py: each must be refused in one line, never cast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seqtrain.data import Corpus, DataConfig


def floats(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """The file's bytes as float32 values in [0, 1): cast to ids they would all be 0."""
    values = np.frombuffer(path.read_bytes(), dtype=np.uint8) / 256
    return Corpus(values.astype(np.float32), np.zeros(1, np.int64), path.name)


def not_a_corpus(path: Path, cfg: DataConfig, budget: int | None) -> list:
    return [path.read_bytes()]


def big_ids(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """Token ids that reach 999, though it says its vocabulary is data.vocab_size (else 256)."""
    ids = np.arange(len(path.read_bytes())) % 1000
    starts = np.zeros(1, np.int64)
    return Corpus(ids.astype(np.int32), starts, path.name, cfg.vocab_size or 256, tokenized=True)


def wide_bytes(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """The file's bytes as int64 values: text, but eight bytes of memory each."""
    values = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64)
    return Corpus(values, np.zeros(1, np.int64), path.name)
