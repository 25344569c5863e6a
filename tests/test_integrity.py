"""What seqtrain reads is verified, not trusted (issue #24, the data side).

A cached artifact is used only when its content is what was written (its hash) and the code that
wrote it is today's (the tokenizer's version); nothing in a corpus is dropped or reinterpreted
without a word; degenerate data warns before training; a stopped tokenization leaves no temporary
file. Each test reproduces one named example of the issue and asserts the outcome.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seqtrain import data
from seqtrain.data import DataConfig, load_splits
from seqtrain.errors import DataError

from .conftest import PLUGINS, refusal, with_pythonpath
from .test_tokenizers import lines_of_words

STREAMS = {"train": 2, "val": 2}
TINY = ["+debug=tiny", "trainer.sample_length=0"]


def corpus(tmp_path: Path, lines: int = 400) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(lines_of_words(lines))
    return path


def run(cfg: DataConfig, caplog) -> tuple[data.Splits, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        splits = load_splits(cfg, STREAMS, 8)
    return splits, caplog.text


def tokens(splits: data.Splits) -> dict[str, list[int]]:
    """Every split's ids, copied out of the cache file (which a test then damages)."""
    return {name: part.values.tolist() for name, part in splits.parts.items()}


def cli_error(monkeypatch, capsys, tmp_path: Path, *args: str) -> str:
    """The one line `python -m seqtrain ARGS` prints, run in-process; it must exit 2."""
    from seqtrain import cli

    argv = ["seqtrain", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    return refusal(cli.main, capsys=capsys)


# --- 1. The token cache is verified: content hash, tokenizer version, ids against the vocabulary


def test_a_zeroed_token_cache_of_the_right_size_is_rebuilt(tmp_path: Path, caplog) -> None:
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="word", cache_dir=str(tmp_path / "c"))
    first = tokens(run(cfg, caplog)[0])
    (bin_file,) = (tmp_path / "c" / "tokens").glob("*.bin")
    bin_file.write_bytes(bytes(bin_file.stat().st_size))  # the size still matches its .json
    again, log = run(cfg, caplog)
    assert "does not match its hash; tokenizing again" in log and "tokenized in" in log
    assert tokens(again) == first  # trained on the real tokens, not on zeros
    assert again.parts["train"].values.any()


def test_a_changed_fitted_tokenizer_is_fitted_again(tmp_path: Path, caplog) -> None:
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="word", cache_dir=str(tmp_path / "c"))
    first, _ = run(cfg, caplog)
    (fitted,) = (tmp_path / "c" / "tokens").glob("tokenizer-*.json")
    fitted.write_text(fitted.read_text().replace('"<eos>"', '"<EOS>"'))
    again, log = run(cfg, caplog)
    assert "the fitted tokenizer" in log and "does not match its hash; fitting again" in log
    assert again.spec.tokenizer_state == first.spec.tokenizer_state


FIXED = """
import numpy as np
from seqtrain.tokenizers import Tokenizer


def shift(ids):
    return ids  # OFFSET


class Tok(Tokenizer):
    vocab_size = 256

    @classmethod
    def fit(cls, texts, cfg):
        return cls()

    @classmethod
    def from_state(cls, state):
        return cls()

    def state(self):
        return {}

    def encode(self, text):
        return shift(np.frombuffer(text, dtype=np.uint8))

    def decode(self, ids):
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")
"""


def test_a_fixed_tokenizer_plugin_tokenizes_anew(tmp_path: Path, monkeypatch, caplog) -> None:
    """The cache key holds the plug-in's code version (the hash of its module's source): the
    tokens of the buggy encode are not reused once it is fixed, here in a helper it calls."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="fixme_tok:Tok")
    cfg.cache_dir = str(tmp_path / "c")
    results = []
    for encode in ("// 2", ""):  # the buggy encode, then the fixed one
        (plugin / "fixme_tok.py").write_text(FIXED.replace("  # OFFSET", f" {encode}"))
        importlib.invalidate_caches()
        sys.modules.pop("fixme_tok", None)
        results.append(run(cfg, caplog))
    (buggy, _), (fixed, log) = results
    assert "tokenized in" in log and "tokens from the cache" not in log
    text = np.frombuffer(Path(cfg.path).read_bytes(), dtype=np.uint8)
    assert np.array_equal(fixed.parts["train"].values[:100], text[:100])
    assert not np.array_equal(buggy.parts["train"].values[:100], text[:100])
    sys.modules.pop("fixme_tok", None)


def test_a_plugin_version_attribute_is_its_code_version() -> None:
    from seqtrain.tokenizers import WordTokenizer, code_version

    class Mine(WordTokenizer):
        version = "2024.1"

    assert code_version(Mine).startswith(f"{__name__}.")
    assert "Mine=2024.1" in code_version(Mine) and "WordTokenizer=1" in code_version(Mine)


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("Wraps", "encode gave id 273, outside its vocab_size=256 (ids 0..255)"),
        ("Floats", "encode gave a float32 array of shape"),
        ("Unsaveable", "its state() is not JSON data (Object of type set"),
    ],
)
def test_plugin_ids_are_checked_before_the_cast(
    tmp_path: Path, monkeypatch, plugin: str, message: str
) -> None:
    """A uint8 cache would wrap id 300 to 44, floats would be cast, a state that is not JSON
    was a traceback: one line instead."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    name = f"bad_tokenizers:{plugin}"
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer=name, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=re.escape(f"data.tokenizer={name}: {message}")):
        load_splits(cfg, STREAMS, 8)
    assert not list((tmp_path / "c" / "tokens").glob("*.bin"))  # nothing half-written is kept
    assert not list((tmp_path / "c" / "tokens").glob(".*.tmp"))


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("NoEncode", "NoEncode lacks encode, decode of the tokenizer protocol"),
        ("a_function", "is a function, not a class like Tokenizer"),
    ],
)
def test_a_tokenizer_plugin_is_checked_when_it_is_named(
    tmp_path: Path, monkeypatch, capsys, plugin: str, message: str
) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    name = f"bad_tokenizers:{plugin}"
    err = cli_error(monkeypatch, capsys, tmp_path, f"data.tokenizer={name}")
    assert f"data.tokenizer={name}: {message}" in err


def test_cached_ids_outside_the_vocabulary_are_rebuilt(tmp_path: Path, caplog) -> None:
    """A cache whose hash matches but whose ids do not fit the tokenizer (a cache written by
    another version, or by hand) is not used."""
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="word", cache_dir=str(tmp_path / "c"))
    first = tokens(run(cfg, caplog)[0])
    (bin_file,) = (tmp_path / "c" / "tokens").glob("*.bin")
    meta_file = bin_file.with_suffix(".json")
    ids = np.fromfile(bin_file, dtype=np.uint8)
    ids[0] = 255  # far above the word vocabulary, and hashed as if written so
    ids.tofile(bin_file)
    meta = json.loads(meta_file.read_text())
    meta["blake2b"]["bin"] = data.blake2b(ids.tobytes())
    meta_file.write_text(json.dumps(meta))
    again, log = run(cfg, caplog)
    assert "holds ids up to 255" in log and "tokenized in" in log
    assert tokens(again) == first


# --- 2. Nothing in a corpus is dropped or reinterpreted without a word


def folder(tmp_path: Path) -> Path:
    """A corpus folder of two subfolders of text files."""
    for sub in ("a", "b"):
        (tmp_path / "docs" / sub).mkdir(parents=True)
        (tmp_path / "docs" / sub / "t.txt").write_text(lines_of_words(100, seed=len(sub)))
    return tmp_path / "docs"


def test_an_unreadable_subfolder_is_an_error_not_skipped(tmp_path, monkeypatch, capsys) -> None:
    """Root reads any folder, so the permission error is faked where os.walk lists `b`."""
    docs = folder(tmp_path)
    real = os.scandir

    def scandir(path):
        if Path(path) == docs / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    err = cli_error(monkeypatch, capsys, tmp_path, f"data.path={docs}")
    assert f"data.path={docs}: cannot read {docs / 'b'} (Permission denied)" in err


@pytest.mark.parametrize("pattern", ["*/t.txt", "**/*.txt"])
def test_a_glob_over_an_unreadable_folder_is_an_error(tmp_path, monkeypatch, pattern) -> None:
    """glob skipped the folder it could not list, and trained on the rest."""
    docs = folder(tmp_path)
    real = os.scandir

    def scandir(path="."):
        if Path(path) == docs / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"cannot read {docs / 'b'} \\(Permission denied\\)"):
        data.path_files(str(docs / pattern))
    assert data.path_files(str(docs / "a" / "*.txt")) == [docs / "a" / "t.txt"]


def test_a_folder_without_search_permission_is_an_error(tmp_path, monkeypatch) -> None:
    """Its names are listed, but a file in it cannot be opened: faked as root."""
    docs = folder(tmp_path)
    real = Path.stat

    def stat(self, **kwargs):
        if self.parent == docs / "b":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(DataError, match=f"cannot read {docs / 'b' / 't.txt'} \\(Permission"):
        data.path_files(str(docs))


def test_special_files_and_symlinked_folders_below_a_folder_are_skipped_with_a_warning(
    tmp_path: Path, caplog
) -> None:
    """A FIFO (reading it would block), a socket and a symlinked folder under data.path were
    left out without a word; now each kind is one WARNING, kept in the spec (summary.json)."""
    docs = folder(tmp_path)
    os.mkfifo(docs / "a" / "fifo")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "t.txt").write_text(lines_of_words(100))
    (docs / "linked").symlink_to(tmp_path / "elsewhere")
    splits, log = run(DataConfig(path=str(docs)), caplog)
    special, links = splits.spec.warnings
    assert f"skipped {docs / 'a' / 'fifo'}: not regular files" in special
    assert f"skipped {docs / 'linked'}: symlinked folders are not followed" in links
    assert special in log and links in log
    files, skipped = data.path_entries(str(docs / "*" / "*"))  # a glob: the FIFO it matches
    assert docs / "a" / "fifo" not in files and "a/fifo: not regular files" in skipped[0]


@pytest.mark.parametrize(
    ("reader", "message"),
    [
        ("floats", "returned float32 values of shape"),
        ("not_a_corpus", "returned a list for"),
        ("big_ids", "returned id 999 for"),
    ],
)
def test_a_reader_plugins_corpus_is_checked_not_cast(
    tmp_path: Path, monkeypatch, capsys, reader: str, message: str
) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    path = corpus(tmp_path)
    args = (f"data.path={path}", f"data.reader=bad_readers:{reader}")
    err = cli_error(monkeypatch, capsys, tmp_path, *args)
    assert f"data.reader=bad_readers:{reader}: {message}" in err
    if reader == "big_ids":
        assert "outside its vocab_size=256 (ids 0..255)" in err


def test_keys_a_source_does_not_read_are_refused_after_it_reads(tmp_path: Path) -> None:
    """Sources whose kind only their output tells: a generated text corpus (copy) ignores both
    series keys, a token array ignores data.target_path."""
    starts = tmp_path / "d.npy"
    np.save(starts, np.array([0, 10]))
    cfg = DataConfig(source="copy", max_bytes=20_000, doc_starts_path=str(starts))
    with pytest.raises(DataError, match="data.doc_starts_path=.*: not read for a corpus of text"):
        load_splits(cfg, STREAMS, 8)
    ids = tmp_path / "t.npy"
    np.save(ids, np.arange(5000) % 50)
    cfg = DataConfig(path=str(ids), vocab_size=50, target_path=str(starts))
    with pytest.raises(DataError, match="data.target_path=.*: not read for a corpus of token ids"):
        load_splits(cfg, STREAMS, 8)


def test_a_reader_plugins_wide_bytes_are_the_same_text(tmp_path: Path, monkeypatch) -> None:
    """Text as int64 values: a tokenizer would read eight bytes per character of it."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    path = corpus(tmp_path)
    cfg = DataConfig(path=str(path), tokenizer="word", cache_dir=str(tmp_path / "c"))
    plain = tokens(load_splits(cfg, STREAMS, 8))
    cfg.reader = "bad_readers:wide_bytes"
    assert tokens(load_splits(cfg, STREAMS, 8)) == plain


def test_a_checked_reader_plugin_still_reads(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    path = tmp_path / "c.csv"
    path.write_text("text\n" + "".join(f"row {i}\n" for i in range(2000)))
    cfg = DataConfig(path=str(path), reader="my_readers:csv_text")
    assert data.load_corpus(cfg).values.tobytes().startswith(b"row 0row 1")


# --- 3. Degenerate data warns loudly, before training, and summary.json says so


def test_a_two_token_vocabulary_warns_and_is_marked_in_the_summary(tmp_path, caplog) -> None:
    """`data.tokenizer=word data.min_count=1000000` keeps <unk> and <eos> alone: it trained and
    reported 0.21 bits per byte without a word."""
    from seqtrain import train
    from seqtrain.config import validate

    from .test_config import composed

    args = [f"data.path={corpus(tmp_path, 2000)}", f"data.cache_dir={tmp_path / 'c'}"]
    args += ["data.tokenizer=word", "data.min_count=1000000"]
    cfg = validate(composed(*TINY, *args))
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        summary = train.fit(train.prepare(cfg, tmp_path / "run"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("a vocabulary of 2 tokens (under 16" in r.getMessage() for r in warned)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_warnings"] == saved["data_warnings"]
    assert any("a vocabulary of 2 tokens" in w for w in saved["data_warnings"])
    assert any("% of the val split's tokens are <unk>" in w for w in saved["data_warnings"])


def test_a_val_split_mostly_unknown_warns(tmp_path: Path, caplog) -> None:
    """Train on 30 words, validate on 30 others: the vocabulary is big enough, the val split
    is nearly all <unk>."""
    known = [f"w{i}" for i in range(30)]
    unknown = [f"x{i}" for i in range(30)]
    path = tmp_path / "c.txt"
    path.write_text(lines_of_words(950, words=known) + lines_of_words(100, 1, words=unknown))
    cfg = DataConfig(path=str(path), tokenizer="word", cache_dir=str(tmp_path / "c"))
    splits, log = run(cfg, caplog)
    (warning,) = splits.spec.warnings
    assert "of the val split's tokens are <unk> (over 50%" in warning
    assert "WARNING  seqtrain" in log and warning in log
    assert splits.spec.input_size >= 16


def test_healthy_text_warns_of_nothing(tmp_path: Path, caplog) -> None:
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="word", cache_dir=str(tmp_path / "c"))
    splits, log = run(cfg, caplog)
    assert splits.spec.warnings == () and "WARNING" not in log


@pytest.mark.parametrize(("written", "read"), [("uint16", "uint8"), ("uint32", "uint16")])
def test_a_bin_read_with_too_narrow_a_dtype_warns(
    tmp_path: Path, caplog, written: str, read: str
) -> None:
    """Ids under 256 written as uint16 and read as uint8: a zero at every second id."""
    ids = np.random.default_rng(0).integers(1, 200, 20_000).astype(written)
    path = tmp_path / "t.bin"
    ids.tofile(path)
    cfg = DataConfig(path=str(path), dtype=read, vocab_size=256)
    splits, log = run(cfg, caplog)
    (warning,) = splits.spec.warnings
    assert f"every second id is 0, as in a {written} file read as data.dtype={read}" in warning
    assert warning in log
    cfg.dtype = written  # read as written: nothing to say
    assert run(cfg, caplog)[0].spec.warnings == ()


def test_a_bin_read_with_too_wide_a_dtype_warns(tmp_path: Path, caplog) -> None:
    """Text bytes written as uint8 and read as uint16 make ids of two bytes each, all inside a
    vocabulary of 65,536: it trained silently. A vocabulary's ids (Zipf-like) and uniform ids
    over all 65,536 say nothing."""
    text = np.frombuffer(lines_of_words(3000).encode(), dtype=np.uint8)
    path = tmp_path / "t.bin"
    text[: len(text) // 2 * 2].tofile(path)
    cfg = DataConfig(path=str(path), dtype="uint16", vocab_size=65536)
    splits, log = run(cfg, caplog)
    (warning,) = splits.spec.warnings
    assert "as in a uint8 file read as data.dtype=uint16" in warning and warning in log
    rng = np.random.default_rng(0)
    for ids in (np.minimum(rng.zipf(1.3, 40_000), 65535), rng.integers(0, 65536, 40_000)):
        ids.astype(np.uint16).tofile(path)
        assert run(cfg, caplog)[0].spec.warnings == ()


# --- 4. A stopped tokenization leaves no temporary file; a SIGKILL's are swept at the next start


def test_ctrl_c_while_tokenizing_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    from seqtrain.tokenizers import WordTokenizer

    calls = []

    def interrupted(self, text: bytes) -> np.ndarray:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(self, text)

    real = WordTokenizer.encode
    monkeypatch.setattr(WordTokenizer, "encode", interrupted)
    monkeypatch.setattr(data, "BLOCK", 4096)  # many blocks: the interrupt lands mid-file
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="word", cache_dir=str(tmp_path / "c"))
    with pytest.raises(KeyboardInterrupt):
        load_splits(cfg, STREAMS, 8)
    assert len(calls) == 2
    left = sorted(p.name for p in (tmp_path / "c" / "tokens").iterdir())
    assert all(name.startswith("tokenizer-") for name in left), left  # the fit only, complete


def test_sigterm_while_tokenizing_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A subprocess: the signal and the exit status are the subject."""
    path = tmp_path / "big.txt"
    path.write_text(lines_of_words(3000))
    mark, cache = tmp_path / "mark", tmp_path / "c"
    script = (
        "from seqtrain.data import DataConfig, load_splits\n"
        f"cfg = DataConfig(path={str(path)!r}, tokenizer='bad_tokenizers:Slow', "
        f"cache_dir={str(cache)!r})\n"
        "load_splits(cfg, {'train': 2}, 8)\n"
    )
    env = {**with_pythonpath(PLUGINS), "SLOW_MARK": str(mark)}
    env["PYTHONPATH"] += os.pathsep + os.environ.get("PYTHONPATH", "")
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((cache / "tokens").glob(".tokens-*.bin.*.tmp"))  # mid-write
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert not list((cache / "tokens").glob(".*.tmp"))
    assert not list((cache / "tokens").glob("tokens-*"))


def test_a_sigkills_temporary_files_are_swept_unless_locked(tmp_path: Path, caplog) -> None:
    cache = tmp_path / "c" / "tokens"
    cache.mkdir(parents=True)
    left, held = cache / ".tokens-a.bin.x1.tmp", cache / ".tokens-b.bin.x2.tmp"
    for temp in (left, held):
        temp.write_bytes(b"\0" * 1000)
        os.utime(temp, (data.STARTED - 60, data.STARTED - 60))  # written before this start
    cfg = DataConfig(path=str(corpus(tmp_path)), tokenizer="word", cache_dir=str(tmp_path / "c"))
    with held.open("rb") as writer:  # another live run's write in progress
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        _, log = run(cfg, caplog)
    assert not left.exists() and f"removed {left}" in log
    assert held.exists()
