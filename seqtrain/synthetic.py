"""The copy task: a corpus whose only hard byte depends on one shown `lag` steps earlier.

Each example is one document of lag + 4 bytes:

    s . . . . . . . . . . . . . . . ? s \\n
    ^ shown    lag dots (filler)    ^ ^ recalled
                                    cue

`s` is drawn uniformly from ALPHABET (16 letters, 4 bits). Where `s` is first shown it is pure
chance for any model; every other byte but the recalled `s` follows from the position. The
recalled `s` needs the model to carry `s` across lag + 2 steps: a model trained with TBPTT windows
shorter than that never receives a gradient linking the two and stays at chance (1/16, 4 bits),
while full BPTT over windows that hold whole examples can learn it.

    python -m seqtrain +experiment=copy_task                      # train (data.source=copy)
    python -m seqtrain.recall ckpt=outputs/.../last.ckpt          # recall accuracy and bits
"""

from __future__ import annotations

import math

import numpy as np

from seqtrain.data import SOURCES, Corpus, DataConfig, DataError

ALPHABET = b"abcdefghijklmnop"  # the symbols to remember: 16, so chance is 4 bits
FILLER, CUE, END = ord("."), ord("?"), ord("\n")


def example_length(lag: int) -> int:
    return lag + 4  # s, lag dots, ?, s, newline


def copy_examples(count: int, lag: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, lag + 4) uint8 examples and their (count,) symbols."""
    rng = np.random.default_rng(seed)
    symbols = np.frombuffer(ALPHABET, dtype=np.uint8)[rng.integers(0, len(ALPHABET), count)]
    out = np.full((count, example_length(lag)), FILLER, dtype=np.uint8)
    out[:, 0] = symbols
    out[:, -3] = CUE
    out[:, -2] = symbols
    out[:, -1] = END
    return out, symbols


def copy_corpus(
    num_bytes: int, lag: int, streams: int = 1, split: tuple = (1.0,), seed: int = 0
) -> Corpus:
    """About num_bytes of examples, each one document (the state resets where it starts).

    Laid out for `streams` training streams: the training split is sized so that every stream
    starts on an example. Otherwise each stream would reset on a different step, and the engine,
    which cuts a window wherever any stream resets, would run every window as ~lag segments.
    """
    length = example_length(lag)
    train = split[0] / sum(split)
    per_stream = max(1, round(num_bytes * train / streams / length)) * length  # L, whole examples
    train_bytes = streams * per_stream + 1  # a stream reads L inputs and one more target
    total = round(train_bytes / train)
    while round(total * train) != train_bytes:  # the split rounds: find the total that fits
        total += 1 if round(total * train) < train_bytes else -1
    examples, _ = copy_examples(math.ceil(total / length), lag, seed)
    starts = np.arange(0, total, length, dtype=np.int64)
    return Corpus(examples.reshape(-1)[:total], starts, f"copy-lag{lag}")


@SOURCES.register("copy")
def copy_source(cfg: DataConfig) -> Corpus:
    """data.source=copy: data.max_bytes of copy-task examples at data.lag."""
    if cfg.lag < 1:
        raise DataError(f"data.lag={cfg.lag}: must be a positive integer")
    if cfg.max_bytes is None:
        raise DataError("data.source=copy needs data.max_bytes: the size of the generated corpus")
    return copy_corpus(cfg.max_bytes, cfg.lag, cfg.batch_size, tuple(cfg.split))
