"""Generated corpora: the copy task and MQAR (bytes), the Mackey-Glass series (floats).

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

Multi-query associative recall (data.source=mqar; Arora et al. 2023, "Zoology"): each example is
one document of (gap + 1) windows. The first window writes `pairs` key-value pairs and queries
every key once; window `gap` queries every key again, each in a random order. The byte after a
queried key is its value:

    window 0:    k1 v1 k2 v2 .. kP vP qk1 qv1 qk2 qv2 .. . . . . . .
    window gap:  . . . . . . . . . .  qk1 qv1 qk2 qv2 .. . . . . . .   (gap >= 1)
                 ^ 2P steps           ^ the queries, at 2P .. 4P - 1

Keys are drawn without repetition from KEYS and values from VALUES, disjoint byte alphabets, so a
value is fixed by its key and nothing else. Examples start on window boundaries, so with gap >= 1
only a state carried across windows (tbptt.carry=true) holds the pairs when window `gap` queries
them; those are the queries recall.py scores. The queries in the first window are what teaches
the writing: TBPTT passes no gradient from a later window's query back to the window that wrote
the pair, so without them writing is never learned (measured: chance at gap 1, docs/cells.md).

    python -m seqtrain +experiment=mqar                           # train (data.source=mqar)
    python -m seqtrain.recall ckpt=outputs/.../last.ckpt          # accuracy on the queried values
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seqtrain.data.corpus import Corpus
from seqtrain.data.sources import SOURCES, DataConfig
from seqtrain.errors import DataError, require

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
    """About num_bytes of copy-task examples, each one document (`documents`)."""
    length = example_length(lag)
    total = documents_length(num_bytes, length, streams, split)
    examples, _ = copy_examples(math.ceil(total / length), lag, seed)
    return documents(examples, total, f"copy-lag{lag}")


def documents_length(
    num_bytes: int, length: int, streams: int, split: tuple, at_most: bool = False
) -> int:
    """The corpus size near num_bytes whose training split is `streams` streams of whole examples.

    Every stream then starts on an example. Otherwise each stream would reset on a different step,
    and the engine, which cuts a window wherever any stream resets, would run every window as
    many short segments. at_most: never more than num_bytes, where data.max_bytes cuts the
    corpus (load_corpus) and a cut would move the streams off the examples.
    """
    train = split[0] / sum(split)
    whole = math.floor if at_most else round
    per_stream = max(1, whole(num_bytes * train / streams / length)) * length  # L, whole examples
    while True:
        train_bytes = streams * per_stream + 1  # a stream reads L inputs and one more target
        total = round(train_bytes / train)
        while round(total * train) != train_bytes:  # the split rounds: find the total that fits
            total += 1 if round(total * train) < train_bytes else -1
        if not at_most or total <= num_bytes or per_stream == length:
            return total
        per_stream -= length


def documents(examples: np.ndarray, total: int, name: str) -> Corpus:
    """(count, length) examples as a corpus of their first `total` bytes, each one document (the
    state resets where it starts)."""
    length = examples.shape[1]
    starts = np.arange(0, total, length, dtype=np.int64)
    return Corpus(examples.reshape(-1)[:total], starts, name)


@SOURCES.register("copy")
def copy_source(cfg: DataConfig) -> Corpus:
    """data.source=copy: data.max_bytes of copy-task examples at data.lag."""
    if cfg.lag < 1:
        raise DataError(f"data.lag={cfg.lag}: must be a positive integer")
    if cfg.max_bytes is None:
        raise DataError("data.source=copy needs data.max_bytes: the size of the generated corpus")
    return copy_corpus(cfg.max_bytes, cfg.lag, cfg.batch_size, tuple(cfg.split))


KEYS = b"abcdefghijklmnopqrstuvwxyz"  # MQAR's keys: up to 26 pairs per example
VALUES = b"ABCDEFGHIJKLMNOP"  # MQAR's values, disjoint from the keys: 16, so chance is 4 bits


@dataclass(frozen=True)
class Mqar:
    """The layout of MQAR examples: `pairs` pairs, queried `gap` windows of `window` steps later."""

    pairs: int
    gap: int
    window: int

    @property
    def length(self) -> int:
        return (self.gap + 1) * self.window

    @property
    def queries(self) -> np.ndarray:
        """(P,) positions of window gap's queried keys; the value to recall is the byte after
        each."""
        start = self.gap * self.window + 2 * self.pairs
        return np.arange(start, start + 2 * self.pairs, 2)

    def examples(self, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(count, length) uint8 examples and the (count, P) values their queries recall."""
        rng = np.random.default_rng(seed)
        keys = np.frombuffer(KEYS, dtype=np.uint8)
        keys = keys[np.argsort(rng.random((count, len(KEYS))), axis=1)[:, : self.pairs]]  # (N, P)
        values = np.frombuffer(VALUES, dtype=np.uint8)[
            rng.integers(0, len(VALUES), (count, self.pairs))
        ]  # (N, P)
        out = np.full((count, self.length), FILLER, dtype=np.uint8)
        out[:, 0 : 2 * self.pairs : 2] = keys
        out[:, 1 : 2 * self.pairs : 2] = values
        for window in sorted({0, self.gap}):  # the first window's queries, then window gap's
            order = np.argsort(rng.random((count, self.pairs)), axis=1)  # (N, P): query order
            answers = np.take_along_axis(values, order, 1)  # (N, P)
            at = self.queries - (self.gap - window) * self.window  # (P,)
            out[:, at] = np.take_along_axis(keys, order, 1)
            out[:, at + 1] = answers
        return out, answers  # the answers of window gap's queries


@SOURCES.register("mqar")
def mqar_source(cfg: DataConfig) -> Corpus:
    """data.source=mqar: data.max_bytes of MQAR examples, data.pairs pairs each, queried data.gap
    windows of data.window steps after they are written."""
    if cfg.window is None:
        raise DataError(
            "data.window=None: data.source=mqar needs the TBPTT window, data.window=${tbptt.window}"
        )
    if cfg.max_bytes is None:
        raise DataError("data.source=mqar needs data.max_bytes: the size of the generated corpus")
    require(cfg.gap >= 0, "data.gap", cfg.gap, "must be 0 (the same window) or more windows")
    require(
        1 <= cfg.pairs <= len(KEYS),
        "data.pairs",
        cfg.pairs,
        f"must be in 1..{len(KEYS)} (one key of {KEYS.decode()} each)",
    )
    require(
        cfg.window >= 4 * cfg.pairs,
        "data.window",
        cfg.window,
        f"must hold the pairs and their queries: at least 4 * data.pairs = {4 * cfg.pairs}",
    )
    task = Mqar(cfg.pairs, cfg.gap, cfg.window)
    total = documents_length(
        cfg.max_bytes, task.length, cfg.batch_size, tuple(cfg.split), at_most=True
    )
    examples, _ = task.examples(math.ceil(total / task.length), seed=0)
    return documents(examples, total, f"mqar-pairs{cfg.pairs}-gap{cfg.gap}-window{cfg.window}")


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
