"""Streams serve every token once, in order; corpora load or fail with one clear line."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from functools import partial

import numpy as np
import pytest
import torch

from seqtrain.data import (
    Corpus,
    DataError,
    Streams,
    concat_files,
    download,
    eval_loader,
    fit_streams,
    read_text_file,
    split_corpus,
    stdlib_files,
)

from .conftest import counting_corpus


@pytest.mark.parametrize(("batch", "stride"), [(3, 7), (4, 16), (1, 5)])
def test_every_target_served_exactly_once_in_stream_order(batch: int, stride: int) -> None:
    rng = np.random.default_rng(0)
    corpus = Corpus(rng.integers(0, 256, 1001, dtype=np.uint8), np.zeros(1, np.int64), "r")
    streams = Streams(corpus, batch, stride)
    inputs = torch.cat([streams[i].inputs for i in range(len(streams))], dim=1)  # (B, L)
    targets = torch.cat([streams[i].targets for i in range(len(streams))], dim=1)  # (B, L)
    L = streams.length  # steps per stream
    assert streams.length == 1000 // batch
    tokens = torch.from_numpy(corpus.values.astype(np.int64))
    for b in range(batch):  # contiguous across windows: stream b is one slice of the corpus
        assert torch.equal(inputs[b], tokens[b * L : (b + 1) * L])
        assert torch.equal(targets[b], tokens[b * L + 1 : (b + 1) * L + 1])  # shifted by one
    assert torch.equal(targets.flatten(), tokens[1 : batch * L + 1])  # every target once
    assert all(streams[i].inputs.shape[1] == stride for i in range(len(streams) - 1))


def test_resets_mark_document_starts_and_stream_starts() -> None:
    corpus = counting_corpus(100, [0, 13, 40, 41, 77])
    streams = Streams(corpus, batch_size=3, stride=10)  # L = 33: streams start at 0, 33, 66
    resets = torch.cat([streams[i].resets for i in range(len(streams))], dim=1)  # (3, 33)
    expected = torch.zeros(3, 33, dtype=torch.bool)
    expected[:, 0] = True
    for pos in (13, 40, 41, 77):
        expected[pos // 33, pos % 33] = True
    assert torch.equal(resets, expected)


def test_an_evaluation_pass_ends_when_a_stop_is_requested() -> None:
    """A stop signal during validation ends the loader: the windows left are not read."""
    streams = Streams(counting_corpus(1000), batch_size=2, stride=10)  # 50 windows
    assert len(list(eval_loader(streams))) == len(streams) == 50
    served: list[int] = []
    loader = eval_loader(streams, stop=lambda: len(served) >= 3)
    for window in loader:
        served.append(int(window.inputs[0, 0]))
    assert served == [0, 10, 20]  # in order, and none after the request


def test_ranks_read_disjoint_streams_that_cover_the_split() -> None:
    corpus = counting_corpus(1000)
    ranks = [Streams(corpus, 2, 50, rank=r, world_size=3) for r in range(3)]
    firsts = torch.cat([s[0].inputs[:, 0] for s in ranks])
    assert firsts.tolist() == [(i * ranks[0].length) % 256 for i in range(6)]


def test_split_is_contiguous_and_keeps_document_starts() -> None:
    corpus = counting_corpus(1000, [0, 100, 920, 960])
    parts = split_corpus(corpus, [0.9, 0.05, 0.05])
    assert [len(p.values) for p in parts.values()] == [900, 50, 50]
    assert np.array_equal(np.concatenate([p.values for p in parts.values()]), corpus.values)
    assert parts["train"].doc_starts.tolist() == [0, 100]
    assert parts["val"].doc_starts.tolist() == [0, 20]
    assert parts["test"].doc_starts.tolist() == [0, 10]


def test_stdlib_corpus_is_sorted_sources_without_site_packages(tmp_path) -> None:
    files = stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert not any("site-packages" in f.parts for f in files)
    corpus = concat_files(files[:20], "stdlib")
    sizes = [f.stat().st_size for f in files[:20]]
    assert len(corpus.values) == sum(sizes)
    assert len(corpus.doc_starts) == sum(1 for s in sizes if s > 0)


def test_non_utf8_bytes_are_data(tmp_path) -> None:
    path = tmp_path / "binary.txt"
    path.write_bytes(bytes(range(256)) * 3)
    assert read_text_file(path).values.tolist() == list(range(256)) * 3


def _empty_file(directory):
    path = directory / "empty.txt"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.txt", "no such file"),
        (lambda p: p, "is a directory"),
        (_empty_file, "empty"),
    ],
)
def test_bad_corpus_paths_are_one_line_errors(tmp_path, make, message) -> None:
    with pytest.raises(DataError, match=message) as err:
        read_text_file(make(tmp_path))
    assert "\n" not in str(err.value)


def test_a_short_evaluation_split_uses_the_streams_that_fit(caplog) -> None:
    """val (50 bytes) holds 2 windows of 17: 2 streams instead of 4, said in one INFO line; too
    short for one window per rank is one line naming what helps; train is never cut."""
    parts = split_corpus(counting_corpus(1000), [0.9, 0.05, 0.05])
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        assert fit_streams(parts, {"train": 4, "val": 4}, window=16) == {"train": 4, "val": 2}
    assert "the val split holds 2 windows of 17 bytes: 2 streams instead of 4" in caplog.text
    with pytest.raises(DataError, match=r"^the val split has 50 bytes, too few for one window"):
        fit_streams(parts, {"val": 4}, window=16, world=3)
    with pytest.raises(DataError, match=r"train split has 900 bytes but 64 streams .* data.batch"):
        fit_streams(parts, {"train": 64}, window=16)


@pytest.fixture
def http_root(tmp_path):
    """A file server on 127.0.0.1 for the download path (no network leaves the machine)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_checks_the_checksum_and_caches(http_root, tmp_path) -> None:
    root, url = http_root
    body = b"To be, or not to be\n" * 50
    (root / "input.txt").write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    cached = download(f"{url}/input.txt", digest, tmp_path / "cache")
    assert cached.read_bytes() == body
    (root / "input.txt").unlink()  # the second call must not need the server
    assert download(f"{url}/input.txt", digest, tmp_path / "cache") == cached
    (root / "other.txt").write_bytes(b"tampered")
    with pytest.raises(DataError, match="checksum mismatch"):
        download(f"{url}/other.txt", digest, tmp_path / "cache")
    assert not (tmp_path / "cache" / "other.txt").exists()


def test_offline_download_says_to_pass_data_path(tmp_path) -> None:
    with pytest.raises(DataError, match=r"pass data.path="):
        download("http://127.0.0.1:9/input.txt", None, tmp_path)


def grid_windows(corpus: Corpus, batch: int, stride: int, rank: int, world: int) -> list[tuple]:
    """The windows as Streams served them before it read lazily: the whole (B, L) grid of
    positions copied up front, resets from an N-sized flag array; the reference for the lazy
    reads."""
    values, targets = corpus.values[:-1], corpus.values[1:]
    starts = corpus.doc_starts[corpus.doc_starts < len(values)]
    length = len(values) // (batch * world)
    offsets = (np.arange(batch) + rank * batch) * length
    grid = offsets[:, None] + np.arange(length)[None, :]  # (B, L)
    is_start = np.zeros(len(values) + 1, dtype=bool)
    is_start[starts] = True
    resets = is_start[grid]
    resets[:, 0] = True
    bounds = [(a, min(a + stride, length)) for a in range(0, length, stride)]
    return [
        (values[grid][:, a:b].astype(np.int64), targets[grid][:, a:b], resets[:, a:b])
        for a, b in bounds
    ]


@pytest.mark.parametrize("seed", range(6))
def test_lazy_windows_equal_the_copied_grid(seed: int) -> None:
    """Random corpora, document starts, batch sizes, strides (a shorter last window included)
    and ranks: every window read lazily equals the one the copied grid gave."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 3000))
    starts = np.unique(np.concatenate([[0], rng.integers(0, n, int(rng.integers(0, 40)))]))
    corpus = Corpus(rng.integers(0, 256, n, dtype=np.uint8), starts.astype(np.int64), "r")
    batch, world = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    stride = int(rng.integers(1, 50))
    for rank in range(world):
        streams = Streams(corpus, batch, stride, rank, world)
        expected = grid_windows(corpus, batch, stride, rank, world)
        assert len(streams) == len(expected)
        for i, (inputs, targets, resets) in enumerate(expected):
            w = streams[i]
            assert w.inputs.dtype == torch.int64 and w.targets.dtype == torch.int64
            assert np.array_equal(w.inputs.numpy(), inputs)
            assert np.array_equal(w.targets.numpy(), targets)
            assert np.array_equal(w.resets.numpy(), resets)


def test_memory_mapped_windows_equal_in_memory_windows(tmp_path) -> None:
    """The same tokens as a file's memory map (read with pread) and as an array in memory."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50_000, 5000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    starts = np.array([0, 17, 999, 4000], dtype=np.int64)
    mapped = Corpus(np.memmap(tmp_path / "t.bin", np.uint16, mode="r"), starts, "m", 50_000)
    memory = Corpus(tokens, starts, "a", 50_000)
    for part in ("train", "val"):  # views of the map at an offset into the file
        a = Streams(split_corpus(mapped, [0.8, 0.1, 0.1])[part], 3, 7, rank=1, world_size=2)
        b = Streams(split_corpus(memory, [0.8, 0.1, 0.1])[part], 3, 7, rank=1, world_size=2)
        assert a.inputs.fd is not None and b.inputs.fd is None  # pread vs indexing
        for i in range(len(a)):
            for field in ("inputs", "targets", "resets"):
                assert torch.equal(getattr(a[i], field), getattr(b[i], field)), (part, i)
