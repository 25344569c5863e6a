"""Corpus files beyond plain text: JSON Lines and pre-tokenized arrays (the identity of a corpus
is cache.py's `fingerprint`).

One source (data.SOURCES): `data.source=pydoc`, the English prose of Python's documentation
topics, for word-level models without a download.

Registered as readers (data.READERS), chosen by suffix or by data.reader:

    jsonl  *.jsonl   each record one document, its text in data.text_field
    bin    *.bin     raw token ids (nanoGPT's prepare.py format), data.dtype wide, memory-mapped
    npy    *.npy     a 1-D integer array of token ids, memory-mapped

A token array is never read whole into memory: its vocabulary check reads it in chunks of a
bounded buffer, and Streams reads each window from the file (data.Rows), so a corpus larger
than memory trains with the process's resident size flat (docs/corpora.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from seqtrain.data.corpus import Corpus, documents
from seqtrain.data.files import check_file, opened
from seqtrain.data.sources import SOURCES, DataConfig, read_doc_starts, register_reader
from seqtrain.data.streams import Rows
from seqtrain.errors import DataError

CHECK_CHUNK = 1 << 22  # token ids per read of the vocabulary check: 4-16 MiB, whatever the file


@SOURCES.register("pydoc")
def pydoc_topics(cfg: DataConfig) -> Corpus:
    """Python's documentation topics (`pydoc_data.topics`, what `help("assert")` prints): about
    465 KB of English prose and grammar in 79 topics, each a document, in sorted name order.
    Every CPython install carries it, so a word-level model has natural language offline (the
    standard library's sources are code). Its text changes with the Python version."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            "data.source=pydoc: this Python has no pydoc_data module (some distributions strip "
            "it); pass data.path=FILE with text instead"
        ) from None
    return documents([topics[name].encode() for name in sorted(topics)], "pydoc-topics")


@register_reader("jsonl", ".jsonl")
def read_jsonl(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """One document per record: the UTF-8 of its data.text_field. Blank lines are skipped; lines
    are read only until `budget` bytes of text are in."""
    texts, size = [], 0
    with opened(path) as f:
        for number, line in enumerate(f, start=1):
            if budget is not None and size >= budget:
                break
            if line.strip():
                texts.append(record_text(line, number, path, cfg.text_field))
                size += len(texts[-1])
    return documents(texts, path.name)


def record_text(line: bytes, number: int, path: Path, key: str) -> bytes:
    """The text of one JSON Lines record; anything else is one line naming the line number."""
    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise DataError(
            f"data.path={path}: line {number} is not JSON ({reason}); each line must hold "
            "one JSON object"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"data.path={path}: line {number} holds a JSON {type(record).__name__}, not an "
            f"object with a '{key}' field (data.text_field)"
        )
    if key not in record:
        keys = ", ".join(record) or "none"
        raise DataError(
            f"data.path={path}: line {number} has no '{key}' field (data.text_field); its "
            f"keys: {keys}"
        )
    text = record[key]
    if not isinstance(text, str):
        raise DataError(
            f"data.path={path}: line {number}: '{key}' holds a {type(text).__name__}, not text"
        )
    return text.encode("utf-8", errors="replace")  # a lone surrogate escape becomes '?'


@register_reader("bin", ".bin", tokens=True)
def read_bin(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """Raw token ids of data.dtype, memory-mapped (only the map is made here)."""
    dtype = np.dtype(cfg.dtype)
    with opened(path) as f:
        size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise DataError(f"data.path={path}: the file is empty; pass a file of token ids")
    if size % dtype.itemsize:
        raise DataError(
            f"data.path={path}: {size:,} bytes is not a whole number of data.dtype={cfg.dtype} "
            f"ids ({dtype.itemsize} bytes each); is data.dtype the one it was written with?"
        )
    corpus = token_corpus(np.memmap(path, dtype=dtype, mode="r"), path, cfg, budget)
    return dataclasses.replace(corpus, warnings=wrong_dtype(corpus.values, path, cfg.dtype))


WIDER = {"uint8": "uint16", "uint16": "uint32"}  # data.dtype -> the dtype twice as wide
DTYPE_SAMPLE = 1 << 16  # ids of a .bin's start whose histogram is checked against data.dtype
SAME_BYTES = 0.1  # the high and low bytes' histograms closer than this (total variation): text


def wrong_dtype(values: np.ndarray, path: Path, dtype: str) -> tuple[str, ...]:
    """A warning when the ids say the file has another dtype, which would otherwise train
    silently: a uint16 file read as uint8 has a zero at every second id (the high bytes of ids
    under 256), a uint32 file read as uint16 likewise; a uint8 file read as uint16 makes each
    id of two bytes of the same text (`two_bytes_each`)."""
    sample = Rows(values).run(0, min(len(values), DTYPE_SAMPLE))
    if len(sample) < 64:
        return ()
    if dtype in WIDER and not sample[1::2].any() and sample[0::2].any():
        return (
            f"data.path={path}: every second id is 0, as in a {WIDER[dtype]} file read as "
            f"data.dtype={dtype}; set data.dtype={WIDER[dtype]} if it was written so",
        )
    if dtype == "uint16" and two_bytes_each(sample):
        return (
            f"data.path={path}: the high and the low byte of its ids have the same histogram, "
            "as in a uint8 file read as data.dtype=uint16; set data.dtype=uint8 if it was "
            "written so",
        )
    return ()


def two_bytes_each(ids: np.ndarray) -> bool:
    """Whether 16-bit ids look like pairs of bytes of one text: the high byte and the low byte
    drawn from one histogram of fewer than 256 values. A vocabulary's ids differ: their high
    byte is skewed to the small values (frequent tokens have small ids, and it stays under
    V / 256), the low byte is spread out; uniform ids over all 65,536 use every byte value."""
    ids = ids.astype(np.int64)
    low = np.bincount(ids & 0xFF, minlength=256) / len(ids)  # (256,)
    high = np.bincount(ids >> 8, minlength=256) / len(ids)  # (256,)
    return np.count_nonzero(low + high) < 256 and 0.5 * np.abs(low - high).sum() < SAME_BYTES


@register_reader("npy", ".npy", tokens=True)
def read_npy(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """A 1-D integer .npy array of token ids, memory-mapped (its header gives the dtype)."""
    check_file(path)
    try:
        values = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"data.path={path}: not a readable .npy array ({err})") from None
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(
            f"data.path={path}: holds a {values.dtype} array of shape {values.shape}; pass a "
            "1-D integer array of token ids"
        )
    if values.size == 0:
        raise DataError(f"data.path={path}: the array is empty; pass one of token ids")
    return token_corpus(values, path, cfg, budget)


def token_corpus(values: np.ndarray, path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """A token array as a Corpus: data.vocab_size given and every id inside it, documents from
    data.doc_starts_path; `budget` keeps the ids of the first budget bytes."""
    if cfg.vocab_size is None:
        raise DataError(
            f"data.vocab_size is required for the token array data.path={path}: set it to the "
            "size of the vocabulary its ids come from (e.g. 50257 for GPT-2's)"
        )
    starts = read_doc_starts(cfg, len(values), "token offsets")
    corpus = Corpus(values, starts, path.name, vocab_size=cfg.vocab_size, tokenized=True)
    if budget is not None:
        corpus = corpus.slice(0, budget // values.itemsize)
    check_ids(corpus.values, cfg.vocab_size, path)
    return corpus


def check_ids(values: np.ndarray, vocab_size: int, path: Path) -> None:
    """Every id in 0..vocab_size - 1, checked chunk by chunk through a bounded buffer (a
    multi-GiB file is never in memory at once, nor its map's pages resident)."""
    rows = Rows(values)
    for start in range(0, len(values), CHECK_CHUNK):
        chunk = rows.run(start, min(CHECK_CHUNK, len(values) - start))
        if chunk.max() >= vocab_size or chunk.min() < 0:
            at = int(np.argmax((chunk >= vocab_size) | (chunk < 0)))
            raise DataError(
                f"data.path={path}: token {start + at:,} has id {chunk[at]}, outside "
                f"data.vocab_size={vocab_size} (ids 0..{vocab_size - 1}); set data.vocab_size "
                "(and for a .bin data.dtype) to the array's"
            )
