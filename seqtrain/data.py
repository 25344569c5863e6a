"""Corpora -> tokens or float rows -> aligned targets -> B contiguous streams -> windows.

The layout is awd-lstm-lm's: a split of N tokens is cut into B equal, contiguous streams and every
stream is read in order, window after window, so the hidden state carried from one window is the
true context of the next. Document boundaries are kept so the engine can reset one stream's state
where a new document starts.

A corpus holds either byte tokens (the byte tokenizer below is the only place that knows there are
256 of them), the token ids of a pre-tokenized array (memory-mapped: never read whole), or the
float rows of a series; `with_targets` pairs every input position with its target, and `describe`
sums up what the model and task must know about the data (a DataSpec, kept in every checkpoint).
What `data.path` may name (a file, a directory, a glob) and how each file is read (`READERS`) is
below; the readers of JSON Lines and token arrays are in corpora.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import math
import os
import sysconfig
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from seqtrain.errors import DataError
from seqtrain.registry import Registry

SPLITS = ("train", "val", "test")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # data.dtype: how a .bin file stores its token ids


@dataclass
class DataConfig:
    source: str = "text"  # what makes the corpus: text (path, url or the stdlib), copy, module:fn
    # A text file; a directory or glob of files (each file a document); a .jsonl file (each
    # record a document); a .bin or .npy array of token ids. None = Python's stdlib sources.
    path: str | None = None
    reader: str | None = None  # how each file is read: text | jsonl | bin | npy; None = by suffix
    text_field: str = "text"  # JSON Lines: the field of each record that holds its text
    dtype: str = (
        "uint16"  # .bin token arrays: uint8 | uint16 | uint32 (nanoGPT's prepare.py: uint16)
    )
    vocab_size: int | None = None  # token arrays (.bin, .npy): ids are 0..vocab_size-1; required
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
    doc_starts_path: str | None = None  # series, token arrays: 1-D .npy of where documents start


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
    # The corpus's identity (corpora.fingerprint): a resume or an evaluation on a corpus that has
    # changed since is refused. None in checkpoints of earlier versions.
    corpus: str | None = None


@dataclass
class Corpus:
    """Tokens or float rows plus the offsets where documents start (always including 0).

    `values` may be a read-only memory map (np.memmap) of a file larger than memory: slicing it
    makes views, and Streams reads its windows from the file, so nothing here copies it.
    """

    values: np.ndarray  # (N,) uint8 tokens, (N,) integer token ids, or (N, F) float32 rows
    doc_starts: np.ndarray  # (D,) int64, sorted, doc_starts[0] == 0
    name: str
    vocab_size: int | None = BYTES.vocab_size  # tokens: the tokenizer's; None: a float series
    targets: np.ndarray | None = None  # aligned with values: row t is the target after row t
    # Token ids already (a .bin or .npy array): no tokenizer runs on them, and the bytes of text
    # behind them are unknown (no bits per byte).
    tokenized: bool = False

    @property
    def unit(self) -> str:
        if self.tokenized:
            return "tokens"
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


def documents(blobs: list[bytes], name: str) -> Corpus:
    """Byte strings, each one document, as one corpus (an empty one starts no document)."""
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    nonempty = starts[lengths > 0]
    return Corpus(BYTES.encode(b"".join(blobs)), np.unique(np.concatenate([[0], nonempty])), name)


def concat_files(files: list[Path], name: str) -> Corpus:
    return documents([f.read_bytes() for f in files], name)


def join(parts: list[Corpus], name: str) -> Corpus:
    """Byte corpora one after another, each keeping its document starts."""
    offsets = np.cumsum([0] + [len(p.values) for p in parts])[:-1]  # (len(parts),)
    starts = [p.doc_starts + offset for p, offset in zip(parts, offsets, strict=True)]
    values = np.concatenate([p.values for p in parts]) if parts else np.zeros(0, np.uint8)
    starts = np.unique(np.concatenate([[0], *starts]).astype(np.int64))
    return Corpus(values, starts[starts < max(len(values), 1)], name)  # an empty tail starts none


def check_file(path: str | Path) -> Path:
    """A corpus file that exists and is regular; a FIFO or device would block or never end."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path}: no such file; pass an existing text file")
    if p.is_dir():
        raise DataError(f"data.path={path}: is a directory; pass a text file")
    if not p.is_file():
        raise DataError(
            f"data.path={path}: is not a regular file (a FIFO, device or socket); pass a text file"
        )
    return p


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[BinaryIO]:
    """A corpus file open for reading; a missing, special or unreadable one is one line naming
    data.path."""
    p = check_file(path)
    try:
        with p.open("rb") as f:
            yield f
    except OSError as err:
        raise DataError(
            f"data.path={path}: cannot read ({err.strerror}); check its permissions"
        ) from err


def read_bytes(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes, at most max_bytes of them (only those are read: a slice of a large
    file costs the slice)."""
    with opened(path) as f:
        try:
            return f.read() if max_bytes is None else f.read(max_bytes)
        except MemoryError:
            size = Path(path).expanduser().stat().st_size
            raise DataError(
                f"data.path={path}: {size:,} bytes do not fit in memory; set data.max_bytes to "
                "train on a slice"
            ) from None


def read_text_file(path: str | Path, max_bytes: int | None = None) -> Corpus:
    """One text file as one document; an empty file is an error."""
    return require_text(read_text(Path(path), DataConfig(), max_bytes), path)


def require_text(corpus: Corpus, path: str | Path) -> Corpus:
    if not len(corpus.values):
        raise DataError(f"data.path={path}: the file is empty; pass a file with text in it")
    return corpus


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
        corpus = read_path(cfg)
    elif cfg.url is not None:
        corpus = read_text_file(download(cfg.url, cfg.sha256, cfg.cache_dir), cfg.max_bytes)
    else:
        corpus = concat_files(stdlib_files(), "python-stdlib")
    if cfg.vocab_size is not None and not corpus.tokenized:
        raise DataError(
            f"data.vocab_size={cfg.vocab_size}: is for token arrays (.bin, .npy); "
            f"'{corpus.name}' is text, whose tokens are bytes"
        )
    return corpus


# ---------------------------------------------------------------------------------------------
# data.path: a file, a directory or a glob; each file read by its reader
# ---------------------------------------------------------------------------------------------

# data.reader -> a function (path, cfg, budget) -> Corpus that reads one file, where budget is the
# most bytes of text wanted (None: all; reading more is allowed, load_corpus cuts). Built-ins:
# "text" here; "jsonl", "bin", "npy" in corpora.py. A user's own: data.reader=my_module:read.
Reader = Callable[[Path, DataConfig, "int | None"], Corpus]
READERS: Registry[Reader] = Registry("data.reader")
SUFFIXES: dict[str, str] = {}  # a file's suffix -> the reader it gets when data.reader is null
TOKEN_READERS: set[str] = set()  # readers of token arrays: one file is the whole corpus


def register_reader(name: str, *suffixes: str, tokens: bool = False) -> Callable[[Reader], Reader]:
    """Register a reader by name, and as the default for files with these suffixes; `tokens`:
    it reads a token array (memory-mapped, never joined with other files)."""

    def add(reader: Reader) -> Reader:
        READERS.register(name)(reader)
        SUFFIXES.update(dict.fromkeys(suffixes, name))
        if tokens:
            TOKEN_READERS.add(name)
        return reader

    return add


@register_reader("text")
def read_text(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """The file's bytes as one document."""
    return Corpus(BYTES.encode(read_bytes(path, budget)), np.zeros(1, dtype=np.int64), path.name)


def reader_name(path: Path, cfg: DataConfig) -> str:
    return cfg.reader or SUFFIXES.get(path.suffix.lower(), "text")


def path_files(path: str) -> list[Path] | None:
    """The files data.path names, in sorted path order: every regular file below a directory
    (hidden files and folders skipped, symlinked folders not followed), or a glob's matches
    (`**` for any depth); None when it names one file."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = []
        for folder, dirs, names in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(folder, n) for n in names if not n.startswith(".")]
        files = sorted(f for f in found if f.is_file())
        if not files:
            raise DataError(
                f"data.path={path}: the directory holds no files (hidden ones are skipped); "
                "pass a directory of text files"
            )
        return files
    if p.exists() or not any(c in path for c in "*?["):
        return None
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise DataError(f"data.path={path}: the glob matches no file; check the pattern")
    return files


def read_path(cfg: DataConfig) -> Corpus:
    """The corpus data.path names; only the first data.max_bytes of text are read."""
    files = path_files(cfg.path)
    if files is None:
        path = Path(cfg.path).expanduser()
        return require_text(READERS.get(reader_name(path, cfg))(path, cfg, cfg.max_bytes), cfg.path)
    parts, budget = [], cfg.max_bytes
    for file in files:
        if budget == 0:
            break
        name = reader_name(file, cfg)
        part = None if name in TOKEN_READERS else READERS.get(name)(file, cfg, budget)
        if part is None or part.tokenized:
            raise DataError(
                f"data.path={cfg.path}: {file} is a token array; name it alone as data.path "
                "(token arrays are memory-mapped one file at a time)"
            )
        parts.append(part)
        budget = None if budget is None else max(0, budget - len(part.values))
    corpus = join(parts, Path(cfg.path).name)
    if not len(corpus.values):
        raise DataError(f"data.path={cfg.path}: its {len(files)} files are empty; pass text")
    return corpus


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
    starts = read_doc_starts(cfg, len(values), "row indices")
    return Corpus(values, starts, Path(cfg.path).name, vocab_size=None, targets=targets)


def read_doc_starts(cfg: DataConfig, n: int, what: str) -> np.ndarray:
    """(D,) sorted int64 document starts from data.doc_starts_path, 0 included; [0] without it."""
    starts = np.zeros(1, dtype=np.int64)
    if cfg.doc_starts_path is not None:
        given = read_array(cfg.doc_starts_path, "data.doc_starts_path", 1)
        integers = np.issubdtype(given.dtype, np.integer)
        if not integers or not ((given >= 0) & (given < n)).all():
            raise DataError(
                f"data.doc_starts_path={cfg.doc_starts_path}: must hold {what} in 0..{n - 1}"
            )
        starts = np.unique(np.concatenate([starts, given.astype(np.int64)]))
    return starts


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
        a, b = index * self.stride, min((index + 1) * self.stride, self.length)
        inputs = self.inputs.runs(self.starts + a, b - a)  # (B, t) or (B, t, F)
        targets = self.targets.runs(self.starts + a, b - a)  # (B, t) or (B, t, K)
        return Window(
            torch.from_numpy(inputs.astype(self.dtype, copy=False)),
            torch.from_numpy(targets.astype(self.dtype, copy=False)),
            torch.from_numpy(self.resets(a, b)),
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
