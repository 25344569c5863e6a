"""A corpus of 1000 token ids, as a tokenizer's output would be, written outside seqtrain:
data.source=random_tokens:zipf_1000 (with this directory on PYTHONPATH)."""

from __future__ import annotations

import numpy as np

from seqtrain.data import Corpus, DataConfig

VOCAB = 1000


def zipf_1000(cfg: DataConfig) -> Corpus:
    """data.max_bytes (default 40,000) ids drawn independently from a Zipf law over VOCAB symbols,
    seeded: id 0 is the most frequent, as in a vocabulary sorted by count (what an adaptive
    softmax's cutoffs assume). The best a model can do is the law's entropy, 5.19 nats."""
    size = cfg.max_bytes or 40_000
    p = 1 / np.arange(1, VOCAB + 1)
    tokens = np.random.default_rng(0).choice(VOCAB, size=size, p=p / p.sum())
    # tokenized: ids, not bytes of text (no tokenizer writes them as text: a run leaves its text
    # samples out by itself, as for a .bin array)
    ids = tokens.astype(np.int32)
    return Corpus(ids, np.zeros(1, np.int64), "zipf-1000", vocab_size=VOCAB, tokenized=True)
