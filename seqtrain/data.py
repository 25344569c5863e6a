"""Corpora -> byte tokens -> B contiguous streams -> windows.

The layout is awd-lstm-lm's: a split of N tokens is cut into B equal, contiguous streams and every
stream is read in order, window after window, so the hidden state carried from one window is the
true context of the next. Document boundaries are kept so the engine can reset one stream's state
where a new document starts.
"""

from __future__ import annotations

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

VOCAB_SIZE = 256  # byte-level: any file works, and bpc on ASCII text equals bits per byte
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


@dataclass
class Corpus:
    """Byte tokens plus the offsets where documents start (always including 0)."""

    tokens: np.ndarray  # (N,) uint8
    doc_starts: np.ndarray  # (D,) int64, sorted, doc_starts[0] == 0
    name: str

    def slice(self, start: int, stop: int) -> Corpus:
        starts = self.doc_starts[(self.doc_starts > start) & (self.doc_starts < stop)] - start
        return Corpus(
            self.tokens[start:stop], np.concatenate([[0], starts]).astype(np.int64), self.name
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
    tokens = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return Corpus(tokens, np.unique(np.concatenate([[0], nonempty])), name)


def read_text_file(path: str | Path) -> Corpus:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path}: no such file; pass an existing text file")
    if p.is_dir():
        raise DataError(f"data.path={path}: is a directory; pass a text file")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise DataError(
            f"data.path={path}: cannot read ({err.strerror}); check its permissions"
        ) from err
    if not raw:
        raise DataError(f"data.path={path}: the file is empty; pass a file with text in it")
    return Corpus(np.frombuffer(raw, dtype=np.uint8), np.zeros(1, dtype=np.int64), p.name)


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
        corpus = corpus.slice(0, min(cfg.max_bytes, len(corpus.tokens)))
    return corpus


@SOURCES.register("text")
def text_source(cfg: DataConfig) -> Corpus:
    """data.path, else the file at data.url (downloaded once), else Python's standard library."""
    if cfg.path is not None:
        return read_text_file(cfg.path)
    if cfg.url is not None:
        return read_text_file(download(cfg.url, cfg.sha256, cfg.cache_dir))
    return concat_files(stdlib_files(), "python-stdlib")


def split_corpus(corpus: Corpus, fractions: list[float]) -> dict[str, Corpus]:
    """Contiguous train/val/test split: no text of one split appears in another."""
    n = len(corpus.tokens)
    bounds = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * n).astype(np.int64)
    return {
        name: corpus.slice(int(a), int(b))
        for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }


def require_tokens(splits: dict[str, Corpus], streams: dict[str, int], window: int) -> None:
    """Every split must give each of its streams at least one full window."""
    for name, count in streams.items():
        need = count * (window + 1)
        have = len(splits[name].tokens)
        if have < need:
            raise DataError(
                f"the {name} split has {have:,} bytes but {count} streams x (tbptt.window {window}"
                f" + 1) need {need:,}; use a larger corpus, a smaller batch size or window"
            )


@dataclass
class Window:
    """One update's new data for every stream."""

    inputs: Tensor  # (B, T) int64
    targets: Tensor  # (B, T) int64: inputs shifted by one
    resets: Tensor  # (B, T) bool: zero that stream's state before step t (a new document starts)
    index: int  # position of this window in the epoch


class Streams(torch.utils.data.Dataset):
    """B contiguous streams over one split, served as windows of `stride` new steps each.

    Stream b reads inputs tokens[b*L : (b+1)*L] and targets one ahead, so over one epoch every
    target token tokens[1 : B*L + 1] is served exactly once; the last window may be shorter.
    With several ranks each rank owns a disjoint, contiguous block of streams.
    """

    def __init__(
        self, corpus: Corpus, batch_size: int, stride: int, rank: int = 0, world_size: int = 1
    ) -> None:
        total = batch_size * world_size
        self.length = (len(corpus.tokens) - 1) // total  # L: steps per stream
        if self.length < 1:
            raise DataError(
                f"corpus '{corpus.name}' has {len(corpus.tokens)} tokens in this split, too few "
                f"for {total} streams; lower data.batch_size or use a larger corpus"
            )
        self.stride = stride
        offsets = (np.arange(batch_size) + rank * batch_size) * self.length  # (B,)
        steps = np.arange(self.length + 1)  # (L+1,)
        grid = offsets[:, None] + steps[None, :]  # (B, L+1) global positions
        self.tokens = torch.from_numpy(corpus.tokens[grid].astype(np.int64))  # (B, L+1)
        is_start = np.zeros(len(corpus.tokens) + 1, dtype=bool)
        is_start[corpus.doc_starts] = True
        resets = is_start[grid[:, :-1]]  # (B, L)
        resets[:, 0] = True  # a stream starts mid-text: the state carried from elsewhere is stale
        self.resets = torch.from_numpy(resets)

    def __len__(self) -> int:
        return -(-self.length // self.stride)

    def __getitem__(self, index: int) -> Window:
        if not 0 <= index < len(self):
            raise IndexError(index)
        a, b = index * self.stride, min((index + 1) * self.stride, self.length)
        return Window(
            self.tokens[:, a:b], self.tokens[:, a + 1 : b + 1], self.resets[:, a:b], index
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


def train_loader(streams: Streams, start: int = 0) -> torch.utils.data.DataLoader:
    """Windows in stream order, one per update, from window `start` on (no shuffling: the order
    *is* the recurrence). Its own generator: making its iterator must not draw from the global
    RNG, or a resumed run's dropout masks would drift from the uninterrupted run's."""
    return torch.utils.data.DataLoader(
        streams,
        batch_size=None,
        sampler=WindowSampler(len(streams), start),
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
