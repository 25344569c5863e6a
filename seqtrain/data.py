"""Corpora -> tokens or float rows -> aligned targets -> B contiguous streams -> windows.

The layout is awd-lstm-lm's: a split of N tokens is cut into B equal, contiguous streams and every
stream is read in order, window after window, so the hidden state carried from one window is the
true context of the next. Document boundaries are kept so the engine can reset one stream's state
where a new document starts.

A source gives a corpus of bytes (text), the token ids of a pre-tokenized array (memory-mapped:
never read whole) or the float rows of a series; what `data.path` may name (a file, a directory, a
glob) and how each file is read (`READERS`) is below, the readers of JSON Lines and token arrays
are in corpora.py. `load_splits` cuts the corpus into train/val/test, turns text into tokens with
data.tokenizer (tokenizers.py; fitted on the training split only, the tokens cached in
data.cache_dir and checked against their hash whenever they are read), pairs every input
position with its target (`with_targets`) and sums up what the model and task must know about
the data (`describe`: a DataSpec, kept in every checkpoint, the tokenizer, the corpus's identity
and the warnings of degenerate data included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import signal
import stat
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from seqtrain.errors import POSITIVE, DataError, require
from seqtrain.registry import Registry
from seqtrain.rundir import atomic_file, remove_stale_temporaries, write_atomic
from seqtrain.tokenizers import (
    BYTES,
    MIN_VOCAB,
    TOKENIZERS,
    Tokenizer,
    check_protocol,
    code_version,
    token_dtype,
)

log = logging.getLogger("seqtrain")
SPLITS = ("train", "val", "test")
TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # data.dtype: how a .bin file stores its token ids
# The data.* keys that tokenizers read; each tokenizer names those it uses (Tokenizer.settings).
TOKENIZER_KEYS = ("vocab_size", "min_count", "tokenizer_file")


@dataclass
class DataConfig:
    source: str = "text"  # what makes the corpus: text (path, url or the stdlib), copy, module:fn
    # A text file; a directory or glob of files (each file a document); a .jsonl file (each
    # record a document); a .bin or .npy array of token ids. None = Python's stdlib sources.
    path: str | None = None
    reader: str | None = None  # how each file is read: text | jsonl | bin | npy; None = by suffix
    text_field: str = "text"  # JSON Lines: the field of each record that holds its text
    # .bin token arrays: uint8 | uint16 | uint32 (nanoGPT's prepare.py writes uint16)
    dtype: str = "uint16"
    # token arrays (.bin, .npy): ids are 0..vocab_size-1, required; word, bpe: the tokens kept,
    # specials included (word: null = every word of the training split)
    vocab_size: int | None = None
    url: str | None = None  # fetched into cache_dir when path is None (e.g. tinyshakespeare)
    sha256: str | None = None  # checksum of the file at url; a mismatch is an error
    cache_dir: str = "~/.cache/seqtrain"  # where downloaded corpora are kept
    max_bytes: int | None = None  # keep only the first max_bytes of the corpus (time budgets)
    batch_size: int = 32  # B: training streams, read in parallel
    eval_batch_size: int = 64  # streams for validation and test (no backward: wider is faster)
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train/val/test
    tokenizer: str = "bytes"  # text -> tokens: bytes | word | bpe | module:Class (tokenizers.py)
    min_count: int = 1  # word: rarer words of the training split become <unk>
    tokenizer_file: str | None = None  # bpe: a tokenizers tokenizer.json instead of training one
    lag: int = 300  # copy task: steps between a symbol and its recall
    pairs: int = 8  # mqar: key-value pairs written, then queried, per example
    gap: int = 1  # mqar: whole windows between the window that writes the pairs and the queries
    # mqar: steps per window of an example, so that examples and queries fall on window
    # boundaries; conf/experiment/mqar.yaml sets it to ${tbptt.window}
    window: int | None = None
    length: int | None = None  # generated series (mackey_glass): rows to generate
    target_path: str | None = None  # series: (N, K) .npy of targets, row t = after input row t
    target_columns: list[int] | None = None  # series: the columns predicted; None = all
    doc_starts_path: str | None = None  # series, token arrays: 1-D .npy of where documents start

    def check(self, saved: bool = False) -> None:
        """data.* on its own, one line per problem. saved: a checkpoint's config, checked when its
        run started; the files its tokenizer settings name belong to that machine (the tokenizer
        itself is in the checkpoint), so they are not looked at again."""
        require(
            self.source in SOURCES, "data.source", self.source, f"choose from {', '.join(SOURCES)}"
        )
        require(self.batch_size > 0, "data.batch_size", self.batch_size, POSITIVE)
        require(self.eval_batch_size > 0, "data.eval_batch_size", self.eval_batch_size, POSITIVE)
        require(
            self.max_bytes is None or self.max_bytes > 0, "data.max_bytes", self.max_bytes, POSITIVE
        )
        if not saved:
            self.check_tokenizer()
        check_data_keys(self)  # symlink loops; keys the source does not read
        require(
            self.reader is None or self.reader in READERS,
            "data.reader",
            self.reader,
            f"choose from {', '.join(READERS)}, or name your own as module:function",
        )
        require(
            self.dtype in TOKEN_DTYPES,
            "data.dtype",
            self.dtype,
            f"choose from {', '.join(TOKEN_DTYPES)}",
        )
        require(
            self.vocab_size is None or self.vocab_size > 0,
            "data.vocab_size",
            self.vocab_size,
            POSITIVE,
        )
        require(
            len(self.split) == 3 and all(0 < f < math.inf for f in self.split),
            "data.split",
            self.split,
            "must be three positive fractions [train, val, test]",
        )

    def check_tokenizer(self) -> None:
        """data.tokenizer exists, a key it does not read keeps its default, and its own check
        passes (vocabulary size, tokenizer_file)."""
        require(
            self.tokenizer in TOKENIZERS,
            "data.tokenizer",
            self.tokenizer,
            f"choose from {', '.join(TOKENIZERS)}, or name your own as module:Class",
        )
        kind = TOKENIZERS.get(self.tokenizer)
        check_protocol(kind, self.tokenizer)  # a plug-in: a class with the protocol's members
        require(self.min_count >= 1, "data.min_count", self.min_count, POSITIVE)
        for key in TOKENIZER_KEYS:
            if key == "vocab_size" and names_token_array(self):
                continue  # a token array's own vocabulary: its reader checks the ids against it
            value, default = getattr(self, key), DataConfig.__dataclass_fields__[key].default
            readers = [n for n in TOKENIZERS if key in TOKENIZERS.get(n).settings]
            require(
                key in kind.settings or value == default,
                f"data.{key}",
                value,
                f"not read by data.tokenizer={self.tokenizer}; it is for data.tokenizer="
                f"{' or '.join(readers)}",
            )
        kind.check(self)


@dataclass(frozen=True)
class DataSpec:
    """What the model and the task need to know about the data; stored in checkpoints, so a model
    is rebuilt (and its figures computed) from the file alone."""

    kind: str  # "tokens": (N,) symbols; "series": (N, F) float rows
    input_size: int  # tokens: the vocabulary V; series: the features F
    target_size: int  # tokens: V; series: the target columns K
    target_variance: float | None = None  # series: of the training targets (nMSE's denominator)
    tokenizer: str = "bytes"  # tokens: data.tokenizer; checkpoints of earlier versions are bytes
    tokenizer_state: dict | None = None  # tokens: the tokenizer's state() (vocabulary, merges)
    # tokens: ids of text the tokenizer decodes; False for a token array (.bin, .npy), whose ids
    # no tokenizer of the run turns back into text (even at a vocabulary of 256, not bytes)
    text: bool = True
    # tokens: UTF-8 bytes per token of each split (bits per byte); None where unknown
    bytes_per_token: dict[str, float] | None = None
    # The corpus's identity (`fingerprint`): a resume or an evaluation on a corpus that has
    # changed since is refused. None in checkpoints of earlier versions.
    corpus: str | None = None
    # What makes the run's figures say little (a tiny vocabulary, a val split mostly <unk>, a
    # .bin read with the wrong data.dtype): logged as WARNINGs and kept in summary.json.
    warnings: tuple[str, ...] = ()


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
    warnings: tuple[str, ...] = ()  # what its reader found suspicious (DataSpec.warnings)

    @property
    def unit(self) -> str:
        if self.vocab_size is None:
            return "rows"
        return "tokens" if self.tokenized or self.vocab_size != BYTES.vocab_size else "bytes"

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
        return read_path(cfg)
    if cfg.url is not None:
        return read_text_file(download(cfg.url, cfg.sha256, cfg.cache_dir), cfg.max_bytes)
    return concat_files(stdlib_files(), "python-stdlib")


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


def names_token_array(cfg: DataConfig) -> bool:
    """Whether data.path is one token array (.bin, .npy): its ids are the tokens already."""
    return cfg.path is not None and reader_name(Path(cfg.path), cfg) in TOKEN_READERS


def path_files(path: str) -> list[Path] | None:
    """The files data.path names, in sorted path order: every regular file below a directory
    (hidden files and folders skipped, symlinked folders not followed), or a glob's matches
    (`**` for any depth); None when it names one file."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(walk_files(p, path))
        if not files:
            raise DataError(
                f"data.path={path}: the directory holds no files (hidden ones are skipped); "
                "pass a directory of text files"
            )
        return files
    if p.exists() or not any(c in path for c in "*?["):
        return None
    check_glob_folders(p, path)
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise DataError(f"data.path={path}: the glob matches no file; check the pattern")
    return files


def check_glob_folders(pattern: Path, path: str) -> None:
    """glob skips a folder it cannot read, and the files in it would be missing: every folder
    the pattern's folder part matches must be readable, else one line."""
    parent = str(pattern.parent)
    folders = glob.glob(parent, recursive=True) if glob.has_magic(parent) else [parent]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        try:
            with os.scandir(folder):
                pass
        except OSError as err:
            raise DataError(
                f"data.path={path}: cannot read {folder} ({err.strerror}); check its "
                "permissions, or narrow the pattern"
            ) from None


def walk_files(root: Path, path: str) -> Iterator[Path]:
    """The regular files below root; a folder or file that cannot be read (no permission, no
    search permission, a dangling link) is one line, never skipped: its text would be missing."""

    def refuse(err: OSError) -> None:
        raise DataError(
            f"data.path={path}: cannot read {err.filename} ({err.strerror}); check its "
            "permissions, or name the folders to read with a glob"
        ) from None

    for folder, dirs, names in os.walk(root, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            file = Path(folder, name)
            try:
                if stat.S_ISREG(file.stat().st_mode):
                    yield file
            except OSError as err:
                refuse(err)


def check_data_keys(cfg: DataConfig) -> None:
    """Refuse, before any work, a file key that is a symlink loop and a key the chosen source
    does not read: data.target_path (series) and data.doc_starts_path (series, token arrays)
    with a text corpus would be ignored."""
    for key in ("path", "target_path", "doc_starts_path", "tokenizer_file"):
        value = getattr(cfg, key)
        if value is None:
            continue
        try:
            os.stat(Path(value).expanduser())
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise DataError(
                    f"data.{key}={value}: is a symlink loop; point it at a file or folder"
                ) from None
    if cfg.source == "text" and not names_token_array(cfg):
        refuse_unread_keys(cfg, "text")


SERIES_KEYS = ("target_path", "doc_starts_path")  # read by series; the second by token arrays too


def refuse_unread_keys(cfg: DataConfig, what: str, keys: tuple[str, ...] = SERIES_KEYS) -> None:
    """One line for a key of `keys` that is set, though a corpus of `what` does not read it."""
    for key in keys:
        if getattr(cfg, key) is not None:
            reads = "data.source=series" + (" and token arrays" if key == "doc_starts_path" else "")
            raise DataError(
                f"data.{key}={getattr(cfg, key)}: not read for a corpus of {what} (only "
                f"{reads} read it); drop it"
            )


def checked_read(part: object, reader: str, file: Path, cfg: DataConfig) -> Corpus:
    """A reader plug-in's corpus, checked, never cast: a Corpus of 1-D integer ids inside its
    vocabulary (bytes of text, or token ids within data.vocab_size). Bytes of text held in a
    wider integer type are narrowed to uint8 once checked (exact): a tokenizer reads the text
    as the array's bytes."""
    key = f"data.reader={reader}"
    if not isinstance(part, Corpus):
        raise DataError(
            f"{key}: returned a {type(part).__name__} for {file}, not a seqtrain.data.Corpus"
        )
    values = np.asarray(part.values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(
            f"{key}: returned {values.dtype} values of shape {values.shape} for {file}; a "
            "corpus holds a 1-D array of integer ids (bytes of text or token ids)"
        )
    vocab = cfg.vocab_size if part.tokenized and cfg.vocab_size is not None else part.vocab_size
    if vocab is None:
        raise DataError(f"{key}: returned a corpus without a vocab_size for {file}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >= vocab):
        bad = int(values.max()) if int(values.max()) >= vocab else int(values.min())
        name = "data.vocab_size" if vocab == cfg.vocab_size else "its vocab_size"
        raise DataError(
            f"{key}: returned id {bad} for {file}, outside {name}={vocab} (ids 0..{vocab - 1})"
        )
    if not part.tokenized and values.dtype != np.uint8:  # bytes of text, held wider: exact
        return dataclasses.replace(part, values=values.astype(np.uint8))
    return part


def read_file(file: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """One file by its reader; a plug-in's return value is checked (`checked_read`)."""
    name = reader_name(file, cfg)
    part = READERS.get(name)(file, cfg, budget)
    return part if name in READERS.names() else checked_read(part, name, file, cfg)


def read_path(cfg: DataConfig) -> Corpus:
    """The corpus data.path names; only the first data.max_bytes of text are read."""
    files = path_files(cfg.path)
    if files is None:
        path = Path(cfg.path).expanduser()
        return require_text(read_file(path, cfg, cfg.max_bytes), cfg.path)
    parts, budget = [], cfg.max_bytes
    for file in files:
        if budget == 0:
            break
        part = None if reader_name(file, cfg) in TOKEN_READERS else read_file(file, cfg, budget)
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


def split_corpus(
    corpus: Corpus, fractions: list[float], at_boundaries: bool = False
) -> dict[str, Corpus]:
    """Contiguous train/val/test split: no text of one split appears in another.

    at_boundaries: each cut moves forward to the next line or document start (with no newline
    left, the next whitespace), so no word is cut in two: tokenizers other than bytes need it.
    """
    n = len(corpus.values)
    bounds = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * n).astype(np.int64)
    if at_boundaries:
        for i in range(1, len(bounds) - 1):
            bounds[i] = boundary(corpus, max(int(bounds[i]), int(bounds[i - 1])))
    return {
        name: corpus.slice(int(a), int(b))
        for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }


NEWLINE = b"\n"
WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() splits on
SCAN = 1 << 16  # bytes searched per step for a boundary
BLOCK = 1 << 20  # bytes of text a tokenizer reads at once (and a progress step)


def after(values: np.ndarray, pos: int, stop: int, marks: bytes) -> int:
    """The first position p in [pos, stop) right after one of `marks`; stop if there is none."""
    wanted = np.frombuffer(marks, dtype=np.uint8)
    i = max(pos - 1, 0)
    while i < stop - 1:
        chunk = values[i : min(i + SCAN, stop - 1)]
        hits = np.flatnonzero(np.isin(chunk, wanted))
        if hits.size:
            return max(i + int(hits[0]) + 1, pos)
        i += chunk.size
    return stop


def next_cut(values: np.ndarray, pos: int, stop: int) -> int:
    """Where to cut text at or after pos without cutting a word: the first line start within
    BLOCK bytes, else the first position after whitespace, else stop."""
    limit = min(stop, pos + BLOCK)
    line = after(values, pos, limit, NEWLINE)
    return line if line < limit else after(values, pos, stop, WHITESPACE)


def boundary(corpus: Corpus, pos: int) -> int:
    """The first document start or `next_cut` at or after pos."""
    if pos <= 0:
        return 0
    later = corpus.doc_starts[corpus.doc_starts >= pos]
    document = int(later[0]) if later.size else len(corpus.values)
    return next_cut(corpus.values, pos, document)


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
    if not variance > 0:
        raise DataError(
            f"the training targets of '{train.name}' have zero variance: nMSE (MSE over the "
            "variance) is undefined; pass a series that varies (data.path, data.target_path, "
            "data.target_columns)"
        )
    return DataSpec("series", train.values.shape[1], targets.shape[1], variance)


@dataclass
class Splits:
    """A run's data: train/val/test tokenized, each paired with its targets, and their spec."""

    parts: dict[str, Corpus]  # train, val, test, each with its targets (`with_targets`)
    spec: DataSpec  # what the model and the task need, the tokenizer included
    prompt: bytes  # the val split's first bytes of text: where the text samples start


def load_splits(
    cfg: DataConfig,
    streams: dict[str, int],
    window: int,
    saved: DataSpec | None = None,
    check_identity: Callable[[str], None] | None = None,
) -> Splits:
    """The corpus of `cfg`, split, tokenized and paired with its targets; every split named in
    `streams` must give that many streams one window each (`require_tokens`).

    The tokenizer (data.tokenizer) is fitted on the training split alone, so no word of val or
    test enters the vocabulary; with `saved`, a checkpoint's spec, it is that run's own tokenizer
    instead and nothing is fitted (resume, evaluate). Each split reports its UTF-8 bytes per
    token, the scale of bits per byte. `check_identity` sees the corpus's fingerprint first.
    """
    name = cfg.tokenizer if saved is None else saved.tokenizer
    if name != cfg.tokenizer:  # a checkpoint of an earlier version has no data.tokenizer key
        raise DataError(
            f"the checkpoint was trained with data.tokenizer={name} (now {cfg.tokenizer}); its "
            "weights read that tokenizer's tokens: use it, or train anew"
        )
    kind = TOKENIZERS.get(name)
    check_data_keys(cfg)
    corpus = load_corpus(cfg)
    if corpus.vocab_size is not None:  # tokens: data.target_path is for series alone
        text = not corpus.tokenized
        refuse_unread_keys(cfg, "text" if text else "token ids", SERIES_KEYS[: 2 if text else 1])
    identity = fingerprint(corpus)  # of the source: what a resume or an evaluation compares
    if check_identity is not None:  # before any work on a corpus that may be refused
        check_identity(identity)
    raw = split_corpus(corpus, cfg.split, at_boundaries=not kind.passthrough)
    is_text = corpus.vocab_size is not None and not corpus.tokenized  # one byte of text each
    if kind.passthrough:  # the corpus's values are the tokens
        tokenizer, parts = kind.from_state({}), raw
    elif not is_text:
        got = "float rows" if corpus.vocab_size is None else "tokens"
        raise DataError(
            f"data.tokenizer={name} reads text, but data.source={cfg.source} gives {got}; use "
            "data.tokenizer=bytes (the default)"
        )
    else:
        state = None if saved is None else saved.tokenizer_state
        tokenizer, parts = tokenize(identity, raw, cfg, name, state)
    tokens = "" if parts is raw else f"; {name} tokens {sizes(parts)}"
    log.info(
        "corpus %s: %s %s, %s documents; train/val/test %s%s",
        corpus.name,
        f"{len(corpus.values):,}",
        corpus.unit,
        f"{len(corpus.doc_starts):,}",
        sizes(raw),
        tokens,
    )
    require_tokens(parts, streams, window)
    paired = {split: with_targets(part, cfg.target_columns) for split, part in parts.items()}
    spec = describe(paired["train"])
    if spec.kind == "tokens":
        ratios = {s: len(raw[s].values) / len(p.values) for s, p in parts.items() if len(p.values)}
        spec = dataclasses.replace(
            spec,
            tokenizer=name,
            tokenizer_state=tokenizer.state(),
            text=is_text,
            bytes_per_token=ratios if is_text else None,
        )
    warnings = (*corpus.warnings, *degenerate(spec, tokenizer, parts["val"], name))
    for warning in warnings:
        log.warning(warning)
    spec = dataclasses.replace(spec, corpus=identity, warnings=warnings)
    return Splits(paired, spec, raw["val"].values[:PROMPT_BYTES].tobytes())


MAX_UNK_SHARE = 0.5  # a val split more <unk> than this measures the tokenizer, not the model
COUNT_CHUNK = 1 << 22  # ids counted at once (through a bounded buffer: data.Rows)


def degenerate(spec: DataSpec, tokenizer: Tokenizer, val: Corpus, name: str) -> list[str]:
    """Why the run's figures would say little: a tiny vocabulary (`data.tokenizer=word
    data.min_count=1000000` keeps <unk> and <eos>: 0.21 bits per byte of nothing learnt), or a
    val split mostly of the unknown token."""
    if spec.kind != "tokens":
        return []
    found = []
    if spec.input_size < MIN_VOCAB:
        found.append(
            f"a vocabulary of {spec.input_size} tokens (under {MIN_VOCAB}, data.tokenizer={name}"
            "): its loss and bits per byte measure almost nothing; check data.min_count, "
            "data.vocab_size or the corpus"
        )
    unk = getattr(tokenizer, "unk_id", None)
    if unk is not None and len(val.values):
        rows = Rows(val.values)
        count = sum(
            int(np.count_nonzero(rows.run(a, min(COUNT_CHUNK, len(val.values) - a)) == unk))
            for a in range(0, len(val.values), COUNT_CHUNK)
        )
        if count / len(val.values) > MAX_UNK_SHARE:
            found.append(
                f"{count / len(val.values):.0%} of the val split's tokens are <unk> (over "
                f"{MAX_UNK_SHARE:.0%}, data.tokenizer={name}): its figures measure the "
                "vocabulary, not the model; lower data.min_count or raise data.vocab_size"
            )
    return found


def sizes(parts: dict[str, Corpus]) -> str:
    return "/".join(f"{len(p.values):,}" for p in parts.values())


PROMPT_BYTES = 48  # of val text, for the samples logged at validation
CACHE_FORMAT = 2  # part of every cache key: a new layout or way of cutting text rebuilds caches
PROGRESS_SECONDS = 30.0  # without a terminal: a log line this often while tokenizing


def tokenize(
    identity: str, raw: dict[str, Corpus], cfg: DataConfig, name: str, state: dict | None
) -> tuple[Tokenizer, dict[str, Corpus]]:
    """The tokenizer (fitted on raw["train"] unless `state` is given) and every split's tokens.

    Both go through data.cache_dir/tokens: the fit is keyed by the corpus's content, the split,
    the tokenizer's settings (a tokenizer_file by its content) and its code version, the tokens by
    the corpus, the split, the code version and the fitted tokenizer itself. A cache of other
    settings or code has another key and is never read; one whose content is not what was
    written (its hash) is written again. Temporary files a killed run left there are removed
    first; SIGTERM while tokenizing leaves none (`stop_on_sigterm`).
    """
    kind = TOKENIZERS.get(name)
    version = code_version(kind)
    cache = Path(cfg.cache_dir).expanduser() / "tokens"
    remove_stale_temporaries(cache, STARTED)
    content = cache_key(identity, CACHE_FORMAT, list(cfg.split))  # the corpus, how it is split
    tokenizer = None
    if state is None:
        key = cache_key(content, name, version, kind.fingerprint(cfg))
        fitted = cache / f"tokenizer-{key}.json"
        state = read_fitted(fitted)
        if state is None:
            progress = Progress(len(raw["train"].values), f"fitting the {name} tokenizer")
            texts = (text for _, text in progress.track(text_blocks(raw["train"])))
            with stop_on_sigterm():
                tokenizer = kind.fit(texts, cfg)
            state = plain_state(tokenizer, name)
            log.info(
                "%s tokenizer fitted on the train split in %.1fs: %s tokens",
                name,
                progress.close(),
                f"{tokenizer.vocab_size:,}",
            )
            record = {"state": state, "blake2b": blake2b(canonical(state))}
            write_cache(cfg, fitted, lambda path: write_atomic(path, json.dumps(record)))
        else:
            log.info("tokenizer from the cache: %s", fitted)
    if tokenizer is None:
        tokenizer = kind.from_state(state)
    stem = cache / f"tokens-{cache_key(content, name, version, state)}"
    parts = read_tokens(stem, raw, tokenizer.vocab_size)
    if parts is None:
        with stop_on_sigterm():
            write_cache(cfg, stem, lambda _: write_tokens(stem, raw, tokenizer, name))
        parts = read_tokens(stem, raw, tokenizer.vocab_size)
    else:
        log.info("tokens from the cache: %s.bin", stem)
    return tokenizer, parts


STARTED = time.time()  # this process's start: a temporary file older than it is no write of ours


def plain_state(tokenizer: Tokenizer, name: str) -> dict:
    """The fitted tokenizer's state(), which the cache and every checkpoint keep as JSON."""
    state = tokenizer.state()
    try:
        canonical(state)
    except (TypeError, ValueError) as err:
        raise DataError(
            f"data.tokenizer={name}: its state() is not JSON data ({err}); return dicts, "
            "lists, strings and numbers"
        ) from None
    return state


def canonical(state: dict) -> bytes:
    return json.dumps(state, sort_keys=True).encode()


def read_fitted(path: Path) -> dict | None:
    """A fitted tokenizer's cached state, or None when there is none or it does not match the
    hash written beside it (then it is fitted again)."""
    record = read_json(path)
    if record is None:
        return None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("state"), dict)
        or record.get("blake2b") != blake2b(canonical(record["state"]))
    ):
        log.info("the fitted tokenizer %s does not match its hash; fitting again", path)
        return None
    return record["state"]


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM as SystemExit(143) while the block runs, so the writers' cleanup removes their
    temporary files (its default action ends the process at once, leaving them behind). Only
    where SIGTERM has its default action, in the main thread: a handler of the run stays."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        log.warning("stopped by SIGTERM while tokenizing; nothing half-written is left")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


SAMPLED_BLOCKS = 64  # a memory-mapped corpus's identity hashes this many blocks spread over it
BLOCK_BYTES = 1 << 16  # of this size each (4 MiB read in all, at every start)


def fingerprint(corpus: Corpus) -> str:
    """The corpus's identity, kept in checkpoints to tell a corpus that changed since.

    In memory: sha256 of its values, targets and document starts, exact. Memory-mapped: sha256
    of its dtype and length and of SAMPLED_BLOCKS blocks spread over it, first and last
    included: hashing a multi-GiB file at every start would cost more than the check is worth,
    and a regenerated, truncated or extended file still differs. The file's time stamps are not
    used: a copy or a touch would otherwise refuse an unchanged corpus.
    """
    digest = hashlib.sha256(np.ascontiguousarray(corpus.doc_starts, dtype=np.int64))
    kinds = set()
    for array in (corpus.values, corpus.targets):
        if array is None:
            continue
        digest.update(f"{array.dtype.str} {array.shape}".encode())
        if file_span(array) is None:
            digest.update(np.ascontiguousarray(array))
            kinds.add("sha256")
        else:
            for block in sampled_blocks(array):
                digest.update(block)
            kinds.add("sampled-sha256")
    return f"{'+'.join(sorted(kinds))}:{digest.hexdigest()}"


def sampled_blocks(array: np.ndarray) -> list[np.ndarray]:
    """SAMPLED_BLOCKS runs of about BLOCK_BYTES each, evenly spaced from the first row to the
    last, read from the file."""
    rows = Rows(array)
    count = max(1, BLOCK_BYTES // rows.row_bytes)
    if len(array) <= SAMPLED_BLOCKS * count:
        return [rows.run(0, len(array))]
    starts = np.linspace(0, len(array) - count, SAMPLED_BLOCKS).astype(np.int64)
    return [rows.run(int(start), count) for start in starts]


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(cfg: DataConfig, path: Path, write: Callable[[Path], None]) -> None:
    """Write into data.cache_dir; a folder that cannot be written is one line naming the key."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as err:
        raise DataError(
            f"data.cache_dir={cfg.cache_dir}: cannot write the tokenized corpus "
            f"({err.strerror or err}); choose a writable folder"
        ) from None


def text_blocks(corpus: Corpus) -> Iterator[tuple[bool, bytes]]:
    """A split's text in pieces of about BLOCK bytes, as (starts a document, bytes): cut at every
    document start and, inside a longer document, at a line start (`next_cut`)."""
    values, n = corpus.values, len(corpus.values)
    ends = [*corpus.doc_starts[1:].tolist(), n]
    for start, end in zip(corpus.doc_starts.tolist(), ends, strict=True):
        a = start
        while a < end:
            b = end if end - a <= BLOCK else next_cut(values, a + BLOCK, end)
            yield a == start, values[a:b].tobytes()
            a = b


def write_tokens(stem: Path, raw: dict[str, Corpus], tokenizer: Tokenizer, name: str) -> None:
    """Encode every split into stem.bin (the tokens, split after split), stem.starts.npy (each
    split's document starts) and stem.json (the sizes and the blake2b of both files, hashed while
    writing), each atomically, the .json last: a cache without its .json is incomplete and is
    written again, one whose files do not match their hashes too (`read_tokens`)."""
    dtype = token_dtype(tokenizer.vocab_size)
    progress = Progress(sum(len(c.values) for c in raw.values()), f"tokenizing ({name})")
    counts, starts, digest = {}, [], hashlib.blake2b()
    with atomic_file(stem.with_suffix(".bin")) as out:
        for split, part in raw.items():
            count, first_tokens = 0, []
            for starts_document, text in progress.track(text_blocks(part)):
                if starts_document:
                    first_tokens.append(count)
                ids = checked_ids(tokenizer.encode(text), tokenizer.vocab_size, name)
                block = ids.astype(dtype, copy=False).tobytes()
                digest.update(block)
                out.write(block)
                count += len(ids)
            split_starts = np.unique(np.array([0, *first_tokens], dtype=np.int64))
            starts.append(split_starts)
            counts[split] = {"tokens": count, "documents": len(split_starts)}
    buffer = io.BytesIO()
    np.save(buffer, np.concatenate(starts))
    with atomic_file(stem.with_suffix(".starts.npy")) as out:
        out.write(buffer.getvalue())
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "splits": counts,
        "blake2b": {"bin": digest.hexdigest(), "starts": blake2b(buffer.getvalue())},
    }
    write_atomic(stem.with_suffix(".json"), json.dumps(meta))
    log.info("tokenized in %.1fs; cached as %s.bin", progress.close(), stem)


def checked_ids(ids: object, vocab_size: int, name: str) -> np.ndarray:
    """A tokenizer's encode output as ids, checked before any cast: integers in 0..vocab_size - 1
    (a cast would wrap an id of 300 to 44 in a uint8 cache)."""
    ids = np.asarray(ids)
    if not ids.size:
        return ids.astype(np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(
            f"data.tokenizer={name}: encode gave a {ids.dtype} array of shape {ids.shape}; it "
            "must return a 1-D array of integer token ids"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise DataError(
            f"data.tokenizer={name}: encode gave id {high if high >= vocab_size else low}, "
            f"outside its vocab_size={vocab_size} (ids 0..{vocab_size - 1}); fix its encode or "
            "vocab_size"
        )
    return ids


def blake2b(raw: bytes) -> str:
    return hashlib.blake2b(raw).hexdigest()


HASH_CHUNK = 1 << 22  # bytes of a cached file read at once to check its hash


def file_digest(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """(blake2b of the file, its largest id as `dtype`), read in chunks of HASH_CHUNK bytes."""
    digest, high = hashlib.blake2b(), -1
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            high = max(high, int(np.frombuffer(chunk, dtype).max()))
    return digest.hexdigest(), high


def read_tokens(stem: Path, raw: dict[str, Corpus], vocab_size: int) -> dict[str, Corpus] | None:
    """The cached splits of stem (memory-mapped), or None if there is no complete cache or its
    content is not what was written: each file must match the hash written beside it, and every
    id be inside the vocabulary. A mismatch is written again, never used."""
    meta = read_json(stem.with_suffix(".json"))
    if meta is None or meta.get("format") != CACHE_FORMAT:
        return None
    bin_path = stem.with_suffix(".bin")
    try:
        counts = {split: meta["splits"][split] for split in raw}
        dtype = np.dtype(meta["dtype"])
        total = sum(c["tokens"] for c in counts.values())
        if bin_path.stat().st_size != total * dtype.itemsize:
            raise ValueError("size")
        starts_raw = stem.with_suffix(".starts.npy").read_bytes()
        starts = np.load(io.BytesIO(starts_raw))
        if len(starts) != sum(c["documents"] for c in counts.values()):
            raise ValueError("starts")
        digest, high = file_digest(bin_path, dtype)
        hashes = meta["blake2b"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("the token cache %s is incomplete; tokenizing again", bin_path)
        return None
    if digest != hashes["bin"] or blake2b(starts_raw) != hashes["starts"]:
        log.info("the token cache %s does not match its hash; tokenizing again", bin_path)
        return None
    if dtype != token_dtype(vocab_size) or high >= vocab_size:
        log.info(
            "the token cache %s holds ids up to %d as %s, not a vocabulary of %d; tokenizing again",
            bin_path,
            high,
            dtype,
            vocab_size,
        )
        return None
    tokens = np.memmap(bin_path, dtype, mode="r") if total else np.zeros(0, dtype)
    parts, at, doc = {}, 0, 0
    for split, part in raw.items():
        n, d = counts[split]["tokens"], counts[split]["documents"]
        parts[split] = Corpus(tokens[at : at + n], starts[doc : doc + d], part.name, vocab_size)
        at, doc = at + n, doc + d
    return parts


class Progress:
    """A long step over `total` bytes: a bar on a terminal, else a log line every
    PROGRESS_SECONDS (nohup, SLURM); `close` returns the seconds it took."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done = total, what, 0
        self.bar = tqdm(
            total=total, desc=what, unit="B", unit_scale=True, disable=not sys.stderr.isatty()
        )
        self.start = self.last = time.monotonic()

    def track(self, blocks: Iterable[tuple[bool, bytes]]) -> Iterator[tuple[bool, bytes]]:
        for block in blocks:
            yield block
            self.done += len(block[1])
            self.bar.update(len(block[1]))
            now = time.monotonic()
            if self.bar.disable and now - self.last >= PROGRESS_SECONDS:
                self.last = now
                log.info(
                    "%s: %d%% of %s bytes",
                    self.what,
                    100 * self.done // max(self.total, 1),
                    f"{self.total:,}",
                )

    def close(self) -> float:
        self.bar.close()
        return time.monotonic() - self.start


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


def eval_loader(streams: Streams) -> torch.utils.data.DataLoader:
    """One pass over the windows, in order."""
    return torch.utils.data.DataLoader(
        streams, batch_size=None, collate_fn=_identity, generator=torch.Generator()
    )


def _identity(window: Window) -> Window:
    return window
