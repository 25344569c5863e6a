"""The tokenized corpus, cached, and a corpus's identity.

`tokenize` fits data.tokenizer on the training split (once), encodes the splits and keeps both
under data.cache_dir/tokens, keyed by the corpus's `fingerprint` and the settings, so a second
run reads them back instead of tokenizing again. The fingerprint is also the corpus identity a
checkpoint keeps: a resume or an evaluation on a corpus that changed since is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seqtrain.data.corpus import BLOCK, Corpus, next_cut
from seqtrain.data.sources import DataConfig
from seqtrain.data.streams import Rows, file_span
from seqtrain.errors import DataError
from seqtrain.rundir import atomic_file, remove_stale_temporaries, write_atomic
from seqtrain.tokenizers import (
    TOKENIZERS,
    Tokenizer,
    code_version,
    token_dtype,
)

log = logging.getLogger("seqtrain")


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
