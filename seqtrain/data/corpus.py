"""What a corpus is: its tokens or rows, where its documents start, what the model and the
task must know about it (DataSpec, kept in every checkpoint), and how text is cut at line starts.

A corpus holds bytes (text), token ids (a pre-tokenized array, possibly memory-mapped: never read
whole) or the float rows of a series, with the offsets where documents start, so the engine can
reset one stream's state where a new document begins; `with_targets` pairs every input position
with its target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqtrain.errors import DataError
from seqtrain.tokenizers import (
    BYTES,
)

SPLITS = ("train", "val", "test")


TOKEN_DTYPES = ("uint8", "uint16", "uint32")  # data.dtype: how a .bin file stores its token ids


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
