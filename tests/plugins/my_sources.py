"""A corpus source written outside seqtrain, as a user would: data.source=my_sources:alphabet."""

from __future__ import annotations

import numpy as np

from seqtrain.data import Corpus, DataConfig


def alphabet(cfg: DataConfig) -> Corpus:
    """data.max_bytes of 'abc...z\\n' lines, each line a document."""
    line = b"abcdefghijklmnopqrstuvwxyz\n"
    size = cfg.max_bytes or 20_000
    tokens = np.frombuffer(line * (size // len(line) + 1), dtype=np.uint8)[:size]
    return Corpus(tokens, np.arange(0, size, len(line), dtype=np.int64), "alphabet")
