"""Generated corpora: the copy task (bytes) and the Mackey-Glass series (floats).

The copy task: a corpus whose only hard byte depends on one shown `lag` steps earlier.

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

The Mackey-Glass series (data.source=mackey_glass), the classic chaotic benchmark for recurrent
predictors, with tau = 17:

    dx/dt = 0.2 x(t - 17) / (1 + x(t - 17)^10) - 0.1 x(t)

    python -m seqtrain +experiment=series                         # task=regression on it
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


MG_TAU = 17.0  # the delay: 17 is the standard chaotic setting (attractor dimension ~2.1)
MG_DT = 0.1  # fixed integration step (time units); tau / dt steps of history
MG_SAMPLE = 1.0  # time units between samples
MG_WARMUP = 1000  # samples dropped at the start: the transient from the constant history


def mackey_glass(length: int, x0: float = 1.2) -> np.ndarray:
    """(length,) samples of Mackey-Glass (tau = 17), RK4 at a fixed step from a constant history.

    The delayed term at a half step is the mean of its two neighbours on the grid. Deterministic:
    the same length gives the same series on every machine.
    """
    lag = round(MG_TAU / MG_DT)
    every = round(MG_SAMPLE / MG_DT)
    steps = (length + MG_WARMUP) * every
    x = [x0] * (lag + 1) + [0.0] * steps  # x[lag] is t = 0; before it, the constant history

    def f(now: float, delayed: float) -> float:
        return 0.2 * delayed / (1.0 + delayed**10) - 0.1 * now

    h = MG_DT
    for i in range(lag, lag + steps):
        d0, d1 = x[i - lag], x[i - lag + 1]
        dm = 0.5 * (d0 + d1)
        k1 = f(x[i], d0)
        k2 = f(x[i] + 0.5 * h * k1, dm)
        k3 = f(x[i] + 0.5 * h * k2, dm)
        k4 = f(x[i] + h * k3, d1)
        x[i + 1] = x[i] + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    samples = np.asarray(x[lag + MG_WARMUP * every :: every][:length], dtype=np.float64)
    return samples


@SOURCES.register("mackey_glass")
def mackey_glass_source(cfg: DataConfig) -> Corpus:
    """data.source=mackey_glass: data.length samples, standardised (zero mean, unit variance),
    as one document of (N, 1) float32 rows."""
    if cfg.length is None or cfg.length < 100:
        raise DataError(
            f"data.length={cfg.length}: data.source=mackey_glass needs at least 100 samples"
        )
    x = mackey_glass(cfg.length)
    x = (x - x.mean()) / x.std()
    values = x.astype(np.float32)[:, None]  # (N, 1)
    return Corpus(values, np.zeros(1, dtype=np.int64), f"mackey-glass{int(MG_TAU)}", None)
