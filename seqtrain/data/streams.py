"""B contiguous streams and their windows, read lazily.

The layout is awd-lstm-lm's: a split of N tokens is cut into B equal, contiguous streams and every
stream is read in order, window after window, so the hidden state carried from one window is the
true context of the next. A window's resets mark where a stream's document starts. Windows of a
memory-mapped corpus are read from the file (`Rows`, with preadv), so no page of it stays
resident. `VariedSpans` draws awd-lstm-lm's variable window lengths.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from seqtrain.data.corpus import Corpus, with_targets
from seqtrain.errors import DataError


@dataclass
class Window:
    """One update's new data for every stream."""

    inputs: Tensor  # (B, T) int64 tokens, or (B, T, F) float32 rows
    targets: Tensor  # (B, T) int64 next tokens, or (B, T, K) float32
    resets: Tensor  # (B, T) bool: zero that stream's state before step t (a new document starts)
    index: int  # position of this window in the epoch


def file_span(array: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of array[0]) when `array` is a C-contiguous view of a file's memory
    map that reads the file itself (np.memmap mode r or r+, np.load(mmap_mode='r')); else None."""
    root = array
    while isinstance(root.base, np.ndarray):  # a view of a view: the root maps the file
        root = root.base
    if not (isinstance(root, np.memmap) and root.mode in ("r", "r+") and root.filename):
        return None
    if not array.flags.c_contiguous:
        return None
    return root.filename, root.offset + (array.ctypes.data - root.ctypes.data)


class Rows:
    """Runs of consecutive rows of an array, copied out: by indexing when it is in memory, and
    with preadv from its file when it is a memory map.

    A page of a map that is read becomes resident in the process (RssFile) and stays so until
    the kernel needs it back, so reading a multi-GiB map window by window would grow the
    process's resident size with the corpus. preadv copies from the page cache, which is not
    the process's: only the rows asked for become its memory.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.row_shape = array.shape[1:]
        self.row_bytes = array.itemsize * math.prod(self.row_shape)
        span = file_span(array) if hasattr(os, "preadv") else None
        self.fd: int | None = None
        if span is not None:
            self.path, self.offset = span
            self.fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self.fd)

    def runs(self, starts: np.ndarray, count: int) -> np.ndarray:
        """Rows starts[i] .. starts[i] + count - 1 for each i: (len(starts), count, ...)."""
        if self.fd is None:
            return self.array[starts[:, None] + np.arange(count)]
        out = np.empty((len(starts), count, *self.row_shape), self.array.dtype)
        for row, start in zip(out, starts.tolist(), strict=True):
            if os.preadv(self.fd, [row], self.offset + start * self.row_bytes) != row.nbytes:
                raise DataError(f"{self.path}: ends early; was it truncated while in use?")
        return out

    def run(self, start: int, count: int) -> np.ndarray:
        """Rows start .. start + count - 1: (count, ...)."""
        return self.runs(np.array([start]), count)[0]


class Streams(torch.utils.data.Dataset):
    """B contiguous streams over one split, served as windows of `stride` new steps each.

    The split's targets are its own (`with_targets`) or, by default, the next step's values. Of N
    aligned positions stream b reads positions b*L : (b+1)*L with L = N // B, so over one epoch
    every target of positions 0 : B*L is served exactly once; the last window may be shorter.
    With several ranks each rank owns a disjoint, contiguous block of streams.

    Nothing is copied up front: each window's positions are read when it is served (from the
    file, for a memory-mapped corpus), so memory does not grow with the corpus.
    """

    def __init__(
        self, corpus: Corpus, batch_size: int, stride: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if corpus.targets is None:
            corpus = with_targets(corpus)
        total = batch_size * world_size
        self.length = len(corpus.values) // total  # L: steps per stream
        if self.length < 1:
            raise DataError(
                f"corpus '{corpus.name}' has {len(corpus.values) + 1} {corpus.unit} in this split, "
                f"too few for {total} streams; lower data.batch_size or use a larger corpus"
            )
        self.stride = stride
        self.starts = (np.arange(batch_size) + rank * batch_size) * self.length  # (B,) positions
        self.inputs, self.targets = Rows(corpus.values), Rows(corpus.targets)
        self.doc_starts = corpus.doc_starts  # (D,) sorted
        # Tokens stay in their small dtype until a window is served.
        self.dtype = np.int64 if corpus.vocab_size is not None else np.float32

    def __len__(self) -> int:
        return -(-self.length // self.stride)

    def resets(self, a: int, b: int) -> np.ndarray:
        """(B, b - a) bool: a document starts at step t of the window a : b of a stream."""
        out = np.zeros((len(self.starts), b - a), dtype=bool)
        first = np.searchsorted(self.doc_starts, self.starts + a)  # (B,) first start inside
        count = np.searchsorted(self.doc_starts, self.starts + b) - first  # (B,) starts inside
        stream = np.repeat(np.arange(len(self.starts)), count)  # (S,) the stream of each start
        flat = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count - first, count)
        out[stream, self.doc_starts[flat] - self.starts[stream] - a] = True
        if a == 0:
            out[:, 0] = True  # a stream starts mid-text: the state carried from elsewhere is stale
        return out

    def __getitem__(self, index: int) -> Window:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.window(index * self.stride, min((index + 1) * self.stride, self.length), index)

    def window(self, start: int, stop: int, index: int) -> Window:
        """Steps start:stop of every stream, as the epoch's window number `index`."""
        inputs = self.inputs.runs(self.starts + start, stop - start)  # (B, t) or (B, t, F)
        targets = self.targets.runs(self.starts + start, stop - start)  # (B, t) or (B, t, K)
        return Window(
            torch.from_numpy(inputs.astype(self.dtype, copy=False)),
            torch.from_numpy(targets.astype(self.dtype, copy=False)),
            torch.from_numpy(self.resets(start, stop)),
            index,
        )


class WindowSampler(torch.utils.data.Sampler[int]):
    """Endless window indices in stream order from a cursor, wrapping into the next epoch.

    The cursor counts windows served since training began, so a resumed run continues with the
    very window the interrupted one would have read next. Training ends at trainer.max_steps.
    """

    def __init__(self, windows: int, start: int = 0) -> None:
        self.windows, self.start = windows, start

    def __iter__(self):
        cursor = self.start
        while True:
            yield cursor % self.windows
            cursor += 1


# awd-lstm-lm's variable windows (tbptt.vary): a length around the window, now and then around
# half of it, with a spread of a few steps; capped so the memory plan (made for the longest) holds.
VARY_HALF = 0.05  # the share of windows drawn around window / 2


VARY_SD = 5  # the standard deviation of a drawn length, in steps


VARY_MIN = 5  # the shortest drawn length


VARY_ABOVE = 3 * VARY_SD  # the longest is window + 15: three deviations, 0.13% of draws cut


def longest_window(window: int) -> int:
    """The most steps a varied window has (the memory planner plans for it)."""
    return window + VARY_ABOVE


def draw_length(rng: np.random.Generator, window: int) -> int:
    """seq_len = max(5, int(N(bptt, 5))) with bptt = window (95%) or window / 2 (5%), capped."""
    bptt = window if rng.random() < 1 - VARY_HALF else window / 2
    return min(longest_window(window), max(VARY_MIN, int(rng.normal(bptt, VARY_SD))))


class VariedSpans(torch.utils.data.Sampler[tuple[int, int, int]]):
    """Endless (start, stop, index) spans of every stream, lengths drawn by `draw_length`.

    Each span starts where the previous one stopped; the one that reaches the stream's end is
    cut there and the next epoch starts at step 0 (index 0). The draws come from a generator of
    their own, seeded with `seed`, so the spans are a function of (seed, cursor): a resumed run
    replays the draws of the `start` spans it has trained and continues with the next one (no
    generator state to save, nothing drawn from the global RNG).
    """

    def __init__(self, length: int, window: int, seed: int, start: int = 0) -> None:
        self.length, self.window, self.seed, self.start = length, window, seed, start

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        position, index, served = 0, 0, 0
        while True:
            stop = min(position + draw_length(rng, self.window), self.length)
            if served >= self.start:
                yield position, stop, index
            served += 1
            position, index = (stop, index + 1) if stop < self.length else (0, 0)


class Spans(torch.utils.data.Dataset):
    """Streams read by (start, stop, index) spans (VariedSpans) instead of fixed windows."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams

    def __getitem__(self, span: tuple[int, int, int]) -> Window:
        return self.streams.window(*span)


def train_loader(
    streams: Streams, start: int = 0, vary_seed: int | None = None
) -> torch.utils.data.DataLoader:
    """Windows in stream order, one per update, from window `start` on (no shuffling: the order
    *is* the recurrence): of `streams.stride` steps, or with `vary_seed` of lengths drawn from
    it (VariedSpans). Its own generator: making its iterator must not draw from the global RNG,
    or a resumed run's dropout masks would drift from the uninterrupted run's."""
    if vary_seed is None:
        dataset, sampler = streams, WindowSampler(len(streams), start)
    else:
        dataset = Spans(streams)
        sampler = VariedSpans(streams.length, streams.stride, vary_seed, start)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        collate_fn=_identity,
        generator=torch.Generator(),
    )


class UntilStopped(torch.utils.data.Sampler[int]):
    """Windows 0 .. windows - 1 in order, ending early once `stop()` is true.

    A stop signal during validation abandons the pass; ending the loader, not only skipping
    its steps, spares reading the thousands of windows left (seconds, on a busy machine).
    """

    def __init__(self, windows: int, stop: Callable[[], bool]) -> None:
        self.windows, self.stop = windows, stop

    def __len__(self) -> int:
        return self.windows

    def __iter__(self):
        for index in range(self.windows):
            if self.stop():
                return
            yield index


def eval_loader(
    streams: Streams, stop: Callable[[], bool] = lambda: False
) -> torch.utils.data.DataLoader:
    """One pass over the windows, in order, cut short once `stop()` is true."""
    return torch.utils.data.DataLoader(
        streams,
        batch_size=None,
        sampler=UntilStopped(len(streams), stop),
        collate_fn=_identity,
        generator=torch.Generator(),
    )


def _identity(window: Window) -> Window:
    return window
