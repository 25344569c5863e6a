"""What data.path may name (a file, a directory, a glob, JSON Lines, token arrays), read in sorted
order with its document starts; memory-mapped corpora train like the same tokens in memory
without their pages becoming resident; a corpus's identity guards resume and evaluation."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from seqtrain import evaluate, sample, train
from seqtrain.config import validate
from seqtrain.data import (
    DataConfig,
    DataError,
    Streams,
    fingerprint,
    load_corpus,
    readers,
    split_corpus,
    stdlib_files,
)
from seqtrain.errors import CheckpointError

from .conftest import (
    PLUGINS,
    assert_exact_resume_in_process,
    composed,
    read_scalars,
    refusal,
    run_in_process,
)

TINY = ["+debug=tiny", "trainer.sample_length=0"]


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def text_bytes(n: int) -> bytes:
    """n bytes of real text (the stdlib's sources: on every machine)."""
    out = b""
    for f in stdlib_files():
        out += f.read_bytes()
        if len(out) >= n:
            return out[:n]
    raise AssertionError("the stdlib is smaller than n bytes")


def load(path: Path | str, **keys) -> tuple[bytes, list[int]]:
    corpus = load_corpus(DataConfig(path=str(path), **keys))
    return corpus.values.tobytes(), corpus.doc_starts.tolist()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder of documents: nested, one empty, hidden ones, and a JSON Lines file."""
    root = tmp_path / "docs"
    write(root / "1.txt", "one")
    write(root / "0.txt", "")  # empty: no document
    write(root / "2" / "3.txt", "three")
    write(root / "4.txt", "four")
    write(root / "5.jsonl", '{"text": "r1"}\n\n{"text": "r2", "id": 2}\n')
    write(root / ".hidden.txt", "secret")
    write(root / ".git" / "HEAD", "ref")
    return root


def test_a_directory_is_its_files_in_sorted_path_order_each_a_document(tree: Path) -> None:
    values, starts = load(tree)
    assert values == b"onethreefourr1r2"  # 0.txt is empty; the JSON Lines records are documents
    assert starts == [0, 3, 8, 12, 14]


def test_a_glob_is_its_matches_in_sorted_order(tree: Path) -> None:
    assert load(tree / "**" / "*.txt") == (b"onethreefour", [0, 3, 8])
    assert load(tree / "[14].txt") == (b"onefour", [0, 3])


def test_json_lines_records_are_documents_read_only_up_to_max_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "abc"}\n{"text": "de"}\n{"text": "fgh"}\n{oops\n')
    assert load(path, max_bytes=5) == (b"abcde", [0, 3])  # the bad line 4 is never read
    with pytest.raises(DataError, match="line 4 is not JSON"):
        load(path)
    body = write(tmp_path / "b.jsonl", '{"body": "x y", "text": 1}\n')
    assert load(body, text_field="body") == (b"x y", [0])


def test_max_bytes_stops_reading_a_directory(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path / "d" / "a.txt", "a" * 100)
    write(tmp_path / "d" / "b.txt", "b" * 100)
    real = Path.open

    def refuse_b(p: Path, *args, **kwargs):
        if p.name == "b.txt":
            raise PermissionError(13, "Permission denied")
        return real(p, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_b)
    assert load(tmp_path / "d", max_bytes=100) == (b"a" * 100, [0])  # b.txt is never opened
    with pytest.raises(DataError, match=r"b.txt: cannot read \(Permission denied\)"):
        load(tmp_path / "d", max_bytes=101)


def test_token_arrays_are_memory_mapped_tokens_with_their_document_starts(tmp_path) -> None:
    tokens = np.arange(1000, dtype=np.uint32) * 7 % 5000
    tokens.astype(np.uint16).tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", tokens.astype(np.int32))
    np.save(tmp_path / "starts.npy", np.array([100, 500]))
    for name, dtype in (("t.bin", "uint16"), ("t.npy", "uint8")):  # .npy: its header's dtype
        cfg = DataConfig(
            path=str(tmp_path / name),
            dtype=dtype,
            vocab_size=5000,
            doc_starts_path=str(tmp_path / "starts.npy"),
        )
        corpus = load_corpus(cfg)
        assert isinstance(corpus.values, np.memmap), name
        assert np.array_equal(corpus.values, tokens), name
        assert corpus.tokenized and corpus.vocab_size == 5000 and corpus.unit == "tokens"
        assert corpus.doc_starts.tolist() == [0, 100, 500]
        half = load_corpus(dataclasses.replace(cfg, max_bytes=600))  # bytes of the file
        assert len(half.values) == 600 // corpus.values.itemsize
        assert half.doc_starts.tolist() == [0, 100] and isinstance(half.values, np.memmap)


def test_the_vocabulary_check_reads_a_token_array_in_bounded_chunks(tmp_path, monkeypatch):
    tokens = np.zeros(10_000, dtype=np.uint16)
    tokens[7_777] = 300
    tokens.tofile(tmp_path / "t.bin")
    monkeypatch.setattr(readers, "CHECK_CHUNK", 1000)
    reads = []
    real = readers.Rows.run
    monkeypatch.setattr(readers.Rows, "run", lambda s, a, n: reads.append(n) or real(s, a, n))
    with pytest.raises(DataError, match=r"token 7,777 has id 300, outside data.vocab_size=300"):
        load(tmp_path / "t.bin", vocab_size=300)
    assert reads == [1000] * 8  # chunk by chunk, up to the one that holds the bad id


def mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's memory maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.endswith(str(path))
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc needed")
def test_serving_every_window_of_a_memory_map_leaves_none_of_its_pages_resident(tmp_path):
    """The vocabulary check, the identity and every window of the train and val streams read
    the file with pread: the map's pages never count in this process's resident size."""
    path = tmp_path / "big.bin"
    np.random.default_rng(0).integers(0, 1000, 4 << 20, dtype=np.uint16).tofile(path)  # 8 MiB
    corpus = load_corpus(DataConfig(path=str(path), vocab_size=1000))
    fingerprint(corpus)
    splits = split_corpus(corpus, [0.8, 0.1, 0.1])
    served = 0
    for name, batch in (("train", 8), ("val", 16)):
        streams = Streams(splits[name], batch, 128)
        served += sum(streams[i].inputs.numel() for i in range(len(streams)))
    assert served > 3 << 20  # nearly all of the file went through windows
    assert mapped_rss_kib(path) == 0
    assert int(corpus.values[:: 1 << 12].sum()) >= 0  # reading through the map itself...
    assert mapped_rss_kib(path) > 1000  # ...does make its pages resident: the measure works


def test_the_identity_is_exact_in_memory_and_sampled_for_a_memory_map(tmp_path) -> None:
    text = write(tmp_path / "a.txt", text_bytes(5000))
    same = fingerprint(load_corpus(DataConfig(path=str(text))))
    assert same.startswith("sha256:")
    write(tmp_path / "copy" / "a.txt", text.read_bytes())  # moved or copied: the same corpus
    assert fingerprint(load_corpus(DataConfig(path=str(tmp_path / "copy" / "a.txt")))) == same
    edited = bytearray(text.read_bytes())
    edited[2500] ^= 1
    write(text, bytes(edited))
    assert fingerprint(load_corpus(DataConfig(path=str(text)))) != same
    tokens = np.random.default_rng(0).integers(0, 1000, 1 << 20, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    cfg = DataConfig(path=str(tmp_path / "t.bin"), vocab_size=1000)
    mapped = fingerprint(load_corpus(cfg))
    assert mapped.startswith("sampled-sha256:")
    tokens[-1] += 1  # the last block is always sampled
    tokens.tofile(tmp_path / "t.bin")
    assert fingerprint(load_corpus(cfg)) != mapped
    tokens[:-1].tofile(tmp_path / "t.bin")  # truncated
    assert fingerprint(load_corpus(cfg)) != mapped


# --- through the command line --------------------------------------------------------------


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_a_memory_mapped_corpus_trains_bit_identically_to_the_same_bytes_as_text(
    tmp_path, caplog, capsys
):
    raw = text_bytes(60_000)
    write(tmp_path / "c.txt", raw)
    np.frombuffer(raw, np.uint8).tofile(tmp_path / "c.bin")
    runs = {
        "text": [f"data.path={tmp_path / 'c.txt'}"],
        "bin": [f"data.path={tmp_path / 'c.bin'}", "data.dtype=uint8", "data.vocab_size=256"],
    }
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        text, mapped = (
            run_in_process(tmp_path / name, *TINY, *args) for name, args in runs.items()
        )
    assert "60,000 tokens" in caplog.text
    assert mapped["val_loss"] == text["val_loss"] and mapped["train_loss"] == text["train_loss"]
    losses = read_scalars(tmp_path / "text", "train/loss")
    assert losses and read_scalars(tmp_path / "bin", "train/loss") == losses
    # The same 256 ids, but only the text run has a tokenizer that turns them back into text.
    sample.main([f"ckpt={text['best_checkpoint']}", "length=20"])
    assert capsys.readouterr().out.strip()
    refused = refusal(
        sample.main, [f"ckpt={mapped['best_checkpoint']}", "length=20"], capsys=capsys
    )
    assert refused == (
        "seqtrain: error: the model reads 256 token ids that no tokenizer of the run turns into "
        "text (data.tokenizer=bytes); it cannot write samples"
    )


def test_a_directory_and_a_json_lines_file_train(tmp_path: Path, caplog) -> None:
    raw = text_bytes(60_000)
    for i in range(6):
        write(tmp_path / "dir" / f"{i}.txt", raw[i * 10_000 : (i + 1) * 10_000])
    lines = [
        json.dumps({"text": raw[i : i + 1000].decode("latin-1")}) for i in range(0, 60_000, 1000)
    ]
    write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    for name, documents in (("dir", "6 documents"), ("c.jsonl", "60 documents")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="seqtrain"):
            done = run_in_process(tmp_path / f"run-{name}", *TINY, f"data.path={tmp_path / name}")
        assert documents in caplog.text and done["steps"] == 6


def test_a_user_reader_by_import_path(tmp_path: Path, monkeypatch, caplog) -> None:
    raw = text_bytes(1800)
    rows = "".join(f'{i},"{raw[i * 20 : i * 20 + 20].hex()}"\n' for i in range(90))
    write(tmp_path / "c.csv", "id,text\n" + rows)
    monkeypatch.syspath_prepend(str(PLUGINS))  # as PYTHONPATH puts a user's module there
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        run_in_process(
            tmp_path / "run",
            *TINY,
            f"data.path={tmp_path / 'c.csv'}",
            "data.reader=my_readers:csv_text",
            "data.batch_size=2",
            "data.eval_batch_size=2",
        )
    assert "3,600 bytes, 90 documents" in caplog.text


def test_resume_on_a_memory_mapped_corpus_is_exact(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 300, 30_000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    args = [*TINY, f"data.path={tmp_path / 't.bin'}", "data.vocab_size=300"]
    args += ["trainer.max_steps=30", "trainer.val_check_interval=15", "model.dropout=0.1"]
    runs = assert_exact_resume_in_process(tmp_path, args)
    assert runs["resumed"]["val_loss"] == runs["reference"]["val_loss"]


def test_a_changed_or_moved_corpus_is_refused_by_resume_and_named_by_evaluate(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    corpus = write(tmp_path / "c.txt", text_bytes(60_000))
    run = tmp_path / "run"
    args = [*TINY, f"data.path={corpus}"]
    train.fit(train.prepare(validate(composed(*args)), run))
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # evaluate reads the corpus where training found it

    def evaluate_(*extra: str) -> tuple[int, str]:
        """python -m seqtrain.evaluate ckpt=... extra: (exit status, its one line or result)."""
        try:
            evaluate.main([ckpt, *extra])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return code, out.err.strip() or out.out

    code, out = evaluate_("split=val")
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(summary(run)["val_loss"])
    write(corpus, corpus.read_bytes()[::-1])  # the same size, other content
    with pytest.raises(CheckpointError, match="its content has changed since"):
        train.prepare(validate(composed(*args, "trainer.max_steps=9", "resume=auto")), run)
    code, err = evaluate_()
    assert code == 2 and "its content has changed since" in err and "\n" not in err
    code, _ = evaluate_(f"data.path={corpus}")  # named on the command line: other text is fine
    assert code == 0
    corpus.rename(tmp_path / "moved.txt")
    code, err = evaluate_()
    assert code == 2 and "which is no longer there (moved or deleted?)" in err


def test_a_token_array_trains_with_the_default_samples_left_out(tmp_path: Path, caplog) -> None:
    """The default trainer.sample_length asks for text a token array cannot give: the run goes
    on without samples and says so (a length named on the command line is refused instead:
    test_bad_input's 'token array with text samples')."""
    tokens = np.random.default_rng(0).integers(0, 300, 30_000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    args = ["+debug=tiny", f"data.path={tmp_path / 't.bin'}", "data.vocab_size=300"]
    args += ["trainer.sample_length=300"]  # the default, which +debug=tiny changes
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        summary = run_in_process(tmp_path / "run", *args)
    assert summary["steps"] == 6
    assert (
        "holds token ids that no tokenizer of the run writes as text: no text samples"
        in caplog.text
    )
