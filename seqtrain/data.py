"""Corpora -> tokens or float rows -> aligned targets -> B contiguous streams -> windows.

The layout is awd-lstm-lm's: a split of N tokens is cut into B equal, contiguous streams and every
stream is read in order, window after window, so the hidden state carried from one window is the
true context of the next. Document boundaries are kept so the engine can reset one stream's state
where a new document starts.

A corpus holds either byte tokens (the byte tokenizer below is the only place that knows there are
256 of them) or the float rows of a series; `with_targets` pairs every input position with its
target, and `describe` sums up what the model and task must know about the data (a DataSpec, kept
in every checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seqtrain.errors import DataError
from seqtrain.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass
class DataConfig:
    source: str = "text"  # what makes the corpus: text (path, url or the stdlib), copy, module:fn
    path: str | None = None  # text file to train on; None = the default corpus (Python's stdlib)
    url: str | None = None  # fetched into cache_dir when path is None (e.g. tinyshakespeare)
    sha256: str | None = None  # checksum of the file at url; a mismatch is an error
    cache_dir: str = "~/.cache/seqtrain"  # where downloaded corpora are kept
    max_bytes: int | None = None  # keep only the first max_bytes of the corpus (time budgets)
    batch_size: int = 32  # B: training streams, read in parallel
    eval_batch_size: int = 64  # streams for validation and test (no backward: wider is faster)
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train/val/test
    lag: int = 300  # copy task: steps between a symbol and its recall
    length: int | None = None  # generated series (mackey_glass): rows to generate
    target_path: str | None = None  # series: (N, K) .npy of targets, row t = after input row t
    target_columns: list[int] | None = None  # series: the columns predicted; None = all
    doc_starts_path: str | None = None  # series: 1-D .npy of row indices where documents start


class ByteTokenizer:
    """Text <-> byte tokens: any file works, and bpc on ASCII text equals bits per byte."""

    vocab_size = 256

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, dtype=np.uint8)  # (N,)

    def decode(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", errors="replace")


BYTES = ByteTokenizer()


@dataclass(frozen=True)
class DataSpec:
    """What the model and the task need to know about the data; stored in checkpoints, so a model
    is rebuilt (and its figures computed) from the file alone."""

    kind: str  # "tokens": (N,) symbols; "series": (N, F) float rows
    input_size: int  # tokens: the vocabulary V; series: the features F
    target_size: int  # tokens: V; series: the target columns K
    target_variance: float | None = None  # series: of the training targets (nMSE's denominator)


@dataclass
class Corpus:
    """Tokens or float rows plus the offsets where documents start (always including 0)."""

    values: np.ndarray  # (N,) uint8 tokens, or (N, F) float32 rows of a series
    doc_starts: np.ndarray  # (D,) int64, sorted, doc_starts[0] == 0
    name: str
    vocab_size: int | None = BYTES.vocab_size  # tokens: the tokenizer's; None: a float series
    targets: np.ndarray | None = None  # aligned with values: row t is the target after row t

    @property
    def unit(self) -> str:
        return "bytes" if self.vocab_size is not None else "rows"

    def slice(self, start: int, stop: int) -> Corpus:
        starts = self.doc_starts[(self.doc_starts > start) & (self.doc_starts < stop)] - start
        return dataclasses.replace(
            self,
            values=self.values[start:stop],
            doc_starts=np.concatenate([[0], starts]).astype(np.int64),
            targets=None if self.targets is None else self.targets[start:stop],
        )


def stdlib_files() -> list[Path]:
    """The running Python's own standard library sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def concat_files(files: list[Path], name: str) -> Corpus:
    blobs = [f.read_bytes() for f in files]
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nonempty = starts[lengths > 0]
    return Corpus(BYTES.encode(b"".join(blobs)), np.unique(np.concatenate([[0], nonempty])), name)


def read_text_file(path: str | Path, max_bytes: int | None = None) -> Corpus:
    """The file's bytes, at most max_bytes of them (only those are read: a slice of a large
    file costs the slice). A FIFO or device would block or never end, so it is refused."""
    p = Path(path).expanduser()
    try:
        if not p.exists():
            raise DataError(f"data.path={path}: no such file; pass an existing text file")
        if p.is_dir():
            raise DataError(f"data.path={path}: is a directory; pass a text file")
        if not p.is_file():
            raise DataError(
                f"data.path={path}: is not a regular file (a FIFO, device or socket); pass a "
                "text file"
            )
        with p.open("rb") as f:
            raw = f.read() if max_bytes is None else f.read(max_bytes)
    except OSError as err:
        raise DataError(
            f"data.path={path}: cannot read ({err.strerror}); check its permissions"
        ) from err
    except MemoryError:
        raise DataError(
            f"data.path={path}: {p.stat().st_size:,} bytes do not fit in memory; set "
            "data.max_bytes to train on a slice"
        ) from None
    if not raw:
        raise DataError(f"data.path={path}: the file is empty; pass a file with text in it")
    return Corpus(BYTES.encode(raw), np.zeros(1, dtype=np.int64), p.name)


def download(url: str, sha256: str | None, cache_dir: str | Path) -> Path:
    """Fetch url into cache_dir once, verifying the checksum; offline is a one-line error."""
    target = Path(cache_dir).expanduser() / Path(url).name
    if target.exists() and (sha256 is None or _sha256(target.read_bytes()) == sha256):
        return target
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"cannot download {url} ({getattr(err, 'reason', err)}); offline? "
            "pass data.path=/path/to/file.txt instead"
        ) from err
    if sha256 is not None and _sha256(raw) != sha256:
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {_sha256(raw)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    partial.write_bytes(raw)
    partial.replace(target)  # atomic: a killed download never leaves a truncated corpus behind
    return target


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# data.source -> a function (DataConfig) -> Corpus. Built-ins: "text" here, the generated corpora
# in synthetic.py; a user's own is named as data.source=my_module:load.
SOURCES: Registry[Callable[[DataConfig], Corpus]] = Registry("data.source")


def load_corpus(cfg: DataConfig) -> Corpus:
    corpus = SOURCES.get(cfg.source)(cfg)
    if cfg.max_bytes is not None:
        corpus = corpus.slice(0, min(cfg.max_bytes, len(corpus.values)))
    return corpus


@SOURCES.register("text")
def text_source(cfg: DataConfig) -> Corpus:
    """data.path, else the file at data.url (downloaded once), else Python's standard library."""
    if cfg.path is not None:
        return read_text_file(cfg.path, cfg.max_bytes)
    if cfg.url is not None:
        return read_text_file(download(cfg.url, cfg.sha256, cfg.cache_dir), cfg.max_bytes)
    return concat_files(stdlib_files(), "python-stdlib")


def read_array(path: str, key: str, ndim: int) -> np.ndarray:
    """A .npy file as an array of `ndim` dimensions; anything else is one line naming `key`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}={path}: no such file; pass an existing .npy array")
    try:
        array = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{key}={path}: not a readable .npy array ({err})") from None
    if array.ndim != ndim:
        shape = "(N, F) rows of features" if ndim == 2 else "(D,) indices"
        raise DataError(f"{key}={path}: has shape {array.shape}; pass a {ndim}-D array, {shape}")
    return array


def read_rows(path: str, key: str) -> np.ndarray:
    """(N, F) finite float rows as float32."""
    array = read_array(path, key, 2)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{key}={path}: holds {array.dtype} values; pass floating-point numbers")
    if not np.isfinite(array).all():
        raise DataError(f"{key}={path}: holds NaN or infinite values; clean or drop those rows")
    return array.astype(np.float32)


@SOURCES.register("series")
def series_source(cfg: DataConfig) -> Corpus:
    """data.source=series: (N, F) float rows from data.path (.npy); targets from data.target_path
    ((N, K), aligned) or else the next row's; documents from data.doc_starts_path or one."""
    if cfg.path is None:
        raise DataError("data.source=series needs data.path=FILE.npy, an (N, F) float array")
    values = read_rows(cfg.path, "data.path")
    targets = None
    if cfg.target_path is not None:
        targets = read_rows(cfg.target_path, "data.target_path")
        if len(targets) != len(values):
            raise DataError(
                f"data.target_path={cfg.target_path}: has {len(targets)} rows but data.path has "
                f"{len(values)}; row t must be the target after input row t"
            )
    starts = np.zeros(1, dtype=np.int64)
    if cfg.doc_starts_path is not None:
        given = read_array(cfg.doc_starts_path, "data.doc_starts_path", 1)
        integers = np.issubdtype(given.dtype, np.integer)
        if not integers or not ((given >= 0) & (given < len(values))).all():
            raise DataError(
                f"data.doc_starts_path={cfg.doc_starts_path}: must hold row indices in "
                f"0..{len(values) - 1}"
            )
        starts = np.unique(np.concatenate([starts, given.astype(np.int64)]))
    return Corpus(values, starts, Path(cfg.path).name, vocab_size=None, targets=targets)


def split_corpus(corpus: Corpus, fractions: list[float]) -> dict[str, Corpus]:
    """Contiguous train/val/test split: no text of one split appears in another."""
    n = len(corpus.values)
    bounds = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * n).astype(np.int64)
    return {
        name: corpus.slice(int(a), int(b))
        for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }


def require_tokens(splits: dict[str, Corpus], streams: dict[str, int], window: int) -> None:
    """Every split must give each of its streams at least one full window."""
    for name, count in streams.items():
        need = count * (window + 1)
        have = len(splits[name].values)
        if have < need:
            unit = splits[name].unit
            raise DataError(
                f"the {name} split has {have:,} {unit} but {count} streams x (tbptt.window {window}"
                f" + 1) need {need:,}; use a larger corpus, a smaller batch size or window"
            )


def with_targets(corpus: Corpus, columns: list[int] | None = None) -> Corpus:
    """Pair every input position with its target: the corpus's own target array (data.target_path)
    or else the next step's values; `columns` picks the target columns of a series (None = all).

    Applied to each split on its own, so no target crosses from one split into the next.
    """
    if columns is not None and corpus.vocab_size is not None:
        raise DataError(
            f"data.target_columns={columns}: picks columns of a numeric series; "
            f"'{corpus.name}' is tokens (use it with data.source=series or mackey_glass)"
        )
    if corpus.targets is None:
        values, targets = corpus.values[:-1], corpus.values[1:]  # target t = value t + 1
    else:
        values, targets = corpus.values, corpus.targets
    if columns is not None:
        width = targets.shape[1]
        bad = [c for c in columns if not 0 <= c < width]
        if bad or not columns:
            raise DataError(
                f"data.target_columns={columns}: the targets have {width} columns; "
                f"choose indices in 0..{width - 1}"
            )
        targets = targets[:, columns]
    starts = corpus.doc_starts[corpus.doc_starts < max(len(values), 1)]
    return dataclasses.replace(corpus, values=values, targets=targets, doc_starts=starts)


def describe(train: Corpus) -> DataSpec:
    """The DataSpec of a run, from its training split with targets (`with_targets`)."""
    if train.vocab_size is not None:
        return DataSpec("tokens", train.vocab_size, train.vocab_size)
    targets = train.targets.astype(np.float64)  # (N, K)
    variance = float(targets.var(axis=0).mean())  # per column around its own mean, then averaged
    return DataSpec("series", train.values.shape[1], targets.shape[1], variance)


@dataclass
class Window:
    """One update's new data for every stream."""

    inputs: Tensor  # (B, T) int64 tokens, or (B, T, F) float32 rows
    targets: Tensor  # (B, T) int64 next tokens, or (B, T, K) float32
    resets: Tensor  # (B, T) bool: zero that stream's state before step t (a new document starts)
    index: int  # position of this window in the epoch


class Streams(torch.utils.data.Dataset):
    """B contiguous streams over one split, served as windows of `stride` new steps each.

    The split's targets are its own (`with_targets`) or, by default, the next step's values. Of N
    aligned positions stream b reads positions b*L : (b+1)*L with L = N // B, so over one epoch
    every target of positions 0 : B*L is served exactly once; the last window may be shorter.
    With several ranks each rank owns a disjoint, contiguous block of streams.
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
        offsets = (np.arange(batch_size) + rank * batch_size) * self.length  # (B,)
        grid = offsets[:, None] + np.arange(self.length)[None, :]  # (B, L) positions
        # Tokens stay in their small dtype here and become int64 one window at a time.
        self.inputs = torch.from_numpy(corpus.values[grid])  # (B, L) or (B, L, F)
        self.targets = torch.from_numpy(corpus.targets[grid])  # (B, L) or (B, L, K)
        self.dtype = torch.int64 if corpus.vocab_size is not None else torch.float32
        is_start = np.zeros(len(corpus.values) + 1, dtype=bool)
        is_start[corpus.doc_starts] = True
        resets = is_start[grid]  # (B, L)
        resets[:, 0] = True  # a stream starts mid-text: the state carried from elsewhere is stale
        self.resets = torch.from_numpy(resets)

    def __len__(self) -> int:
        return -(-self.length // self.stride)

    def __getitem__(self, index: int) -> Window:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.window(index * self.stride, min((index + 1) * self.stride, self.length), index)

    def window(self, start: int, stop: int, index: int) -> Window:
        """Steps start:stop of every stream, as the epoch's window number `index`."""
        return Window(
            self.inputs[:, start:stop].to(self.dtype),
            self.targets[:, start:stop].to(self.dtype),
            self.resets[:, start:stop],
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


def eval_loader(streams: Streams) -> torch.utils.data.DataLoader:
    """One pass over the windows, in order."""
    return torch.utils.data.DataLoader(
        streams, batch_size=None, collate_fn=_identity, generator=torch.Generator()
    )


def _identity(window: Window) -> Window:
    return window
