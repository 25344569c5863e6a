"""data.* and what makes a corpus of it: the sources (`data.source`, `SOURCES`) and the readers
of single files (`data.reader`, `READERS`), registered by name or named by import path.

`text` reads `data.path` (a file, a directory or glob of files, each a document) or downloads
`data.url`, else Python's own standard library; `series` reads (N, F) float rows. The readers of
JSON Lines and token arrays are in readers.py, the generated corpora in synthetic.py.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqtrain.data.corpus import TOKEN_DTYPES, Corpus, concat_files, join
from seqtrain.data.files import (
    download,
    path_entries,
    read_array,
    read_bytes,
    read_rows,
    stdlib_files,
)
from seqtrain.errors import POSITIVE, DataError, require
from seqtrain.registry import Registry
from seqtrain.tokenizers import (
    BYTES,
    TOKENIZERS,
    check_protocol,
)

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
        require(  # [0.8, 0.5, 0.5] was scaled down silently: 44% to train, not 80%
            saved or abs(sum(self.split) - 1) < 1e-3,  # a checkpoint's: as it trained
            "data.split",
            self.split,
            f"the fractions sum to {sum(self.split):g}; they must sum to 1 "
            "(e.g. [0.9, 0.05, 0.05])",
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


def read_text_file(path: str | Path, max_bytes: int | None = None) -> Corpus:
    """One text file as one document; an empty file is an error."""
    return require_text(read_text(Path(path), DataConfig(), max_bytes), path)


def require_text(corpus: Corpus, path: str | Path) -> Corpus:
    if not len(corpus.values):
        raise DataError(f"data.path={path}: the file is empty; pass a file with text in it")
    return corpus


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


# data.reader -> a function (path, cfg, budget) -> Corpus that reads one file, where budget is the
# most bytes of text wanted (None: all; reading more is allowed, load_corpus cuts). Built-ins:
# "text" here; "jsonl", "bin", "npy" in readers.py. A user's own: data.reader=my_module:read.
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


def check_data_keys(cfg: DataConfig) -> None:
    """Refuse, before any work, a file key that is a symlink loop and a key the chosen source
    does not read: data.target_path (series) and data.doc_starts_path (series, token arrays)
    with a text corpus would be ignored. An empty one (`data.path=$CORPUS` with the variable
    unset) named the working folder: data.path='' trained on the files there."""
    for key in ("path", "target_path", "doc_starts_path", "tokenizer_file"):
        value = getattr(cfg, key)
        if value is None:
            continue
        if not str(value).strip():
            raise DataError(
                f"data.{key}={value!r}: is empty (an unset shell variable?); name a file or "
                "folder, or leave the key out"
            )
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
    files, skipped = path_entries(cfg.path)  # skipped: the WARNINGs of what was left out
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
    return dataclasses.replace(corpus, warnings=skipped)


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
        if (np.diff(given) <= 0).any():  # lengths of documents, say, or an unsorted list
            raise DataError(
                f"data.doc_starts_path={cfg.doc_starts_path}: must hold {what} in increasing "
                "order (where each document starts, not the documents' lengths)"
            )
        starts = np.unique(np.concatenate([starts, given.astype(np.int64)]))
    return starts
