"""Tokenizers round-trip text, fit on the training split only, cache their tokens once, travel in
the checkpoint, and every language model reports bits per byte on one scale."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seqtrain import data, evaluate, sample
from seqtrain.config import from_dict, to_dict, validate
from seqtrain.data import (
    SPLITS,
    Corpus,
    DataConfig,
    DataSpec,
    fingerprint,
    load_corpus,
    load_splits,
    split_corpus,
    text_blocks,
    with_targets,
)
from seqtrain.errors import CheckpointError, ConfigError, DataError
from seqtrain.model import ModelConfig
from seqtrain.tasks import LanguageModelling, build_model
from seqtrain.tokenizers import (
    BYTES,
    TOKENIZERS,
    BytePairTokenizer,
    WordTokenizer,
    rebuild,
    token_dtype,
)

from .conftest import PLUGINS, composed, run_in_process

WORDS = "the a cat dog sat on mat ran to house big small red über café naïve 字 and or not"
WORDS = WORDS.split()  # a vocabulary with non-ASCII words


def settings(**given) -> SimpleNamespace:
    return SimpleNamespace(
        **{"tokenizer": "word", "vocab_size": None, "min_count": 1, "tokenizer_file": None, **given}
    )


def lines_of_words(count: int, seed: int = 0, words: list[str] = WORDS) -> str:
    r = random.Random(seed)
    return "".join(
        " ".join(r.choice(words) for _ in range(r.randint(3, 12))) + "\n" for _ in range(count)
    )


def random_unicode(seed: int, length: int = 200) -> str:
    """Any code points but surrogates (which no UTF-8 text holds): scripts, emoji, controls."""
    r = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x2FF), (0x370, 0x3FF), (0x4E00, 0x4FFF)]
    ranges += [(0x1F600, 0x1F64F), (0xE000, 0xE0FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(length):
        lo, hi = r.choice(ranges)
        out.append(chr(r.randint(lo, hi)))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe() -> BytePairTokenizer:
    return BytePairTokenizer.fit([lines_of_words(400).encode()], settings(vocab_size=300))


def test_bytes_and_bpe_round_trip_any_text(bpe: BytePairTokenizer) -> None:
    texts = [random_unicode(seed) for seed in range(40)]
    texts += ["", "\n", "  two  spaces \r\n", "café 字 \U0001f600\t\x00end", lines_of_words(5)]
    for text in texts:
        raw = text.encode()
        assert BYTES.decode(BYTES.encode(raw)) == text
        ids = bpe.encode(raw)
        assert ids.dtype == np.uint16 and (ids < bpe.vocab_size).all()
        assert bpe.decode(ids) == text, text
        assert rebuild("bpe", bpe.state()).decode(ids) == text  # the state is the tokenizer
    assert len(bpe.encode(b"the cat sat on the mat")) < len(b"the cat sat on the mat")  # merges


def test_bpe_training_is_deterministic_and_sized_by_vocab_size() -> None:
    text = [lines_of_words(300, seed=1).encode()]
    first = BytePairTokenizer.fit(text, settings(vocab_size=290))
    assert first.state() == BytePairTokenizer.fit(text, settings(vocab_size=290)).state()
    assert first.vocab_size == 290
    assert BytePairTokenizer.fit(text, settings(vocab_size=280)).vocab_size == 280


def test_token_ids_take_the_smallest_unsigned_type() -> None:
    assert [token_dtype(v) for v in (2, 256, 257, 65536, 65537)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
    ]


def test_word_round_trips_up_to_unk_and_spacing() -> None:
    train = b"the cat sat\nthe dog sat on the mat\n"
    word = WordTokenizer.fit([train], settings())
    assert word.words[:2] == ["<unk>", "<eos>"]
    assert word.words[2:5] == ["the", "sat", "cat"]  # by count, ties by bytes: cat before dog
    text = "the  cat sat on   a\n\nthe zebra café\n"
    ids = word.encode(text.encode())
    assert ids.dtype == np.uint8
    assert ids.tolist().count(WordTokenizer.EOS) == 3  # one per line end, the empty line too
    assert word.decode(ids) == "the cat sat on <unk>\n\nthe <unk> <unk>\n"
    assert word.decode(word.encode(b"the mat")) == "the mat"  # no newline, no <eos>
    assert rebuild("word", word.state()).words == word.words


def test_word_vocabulary_keeps_the_frequent_and_drops_the_rare() -> None:
    train = [b"a a a a b b b c c d\n", b"e e e\n"]
    assert WordTokenizer.fit(train, settings(min_count=3)).words[2:] == ["a", "b", "e"]
    assert WordTokenizer.fit(train, settings(vocab_size=4)).words[2:] == ["a", "b"]  # b before e
    assert WordTokenizer.fit([b"<unk> x <unk>\n"], settings()).words == ["<unk>", "<eos>", "x"]


def write_corpus(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def test_the_word_vocabulary_sees_only_the_training_split(tmp_path: Path) -> None:
    text = lines_of_words(300) + "zebra zebra zebra\n" * 40  # the last lines: val and test only
    cfg = DataConfig(
        path=str(write_corpus(tmp_path, text)), tokenizer="word", cache_dir=str(tmp_path / "c")
    )
    cfg.split = [len(lines_of_words(300).encode()), 360, 360]  # train: the words only
    splits = load_splits(cfg, {"train": 1, "val": 1}, 4)
    words = splits.spec.tokenizer_state["words"]
    assert "zebra" not in words and "cat" in words
    val = splits.parts["val"]
    tokens = np.concatenate([val.values, val.targets[-1:]])
    assert set(tokens.tolist()) == {WordTokenizer.UNK, WordTokenizer.EOS}  # zebra is <unk>
    assert splits.spec.input_size == len(words)


def test_non_byte_splits_are_cut_at_line_starts_or_whitespace() -> None:
    text = lines_of_words(200).encode()
    corpus = Corpus(np.frombuffer(text, np.uint8), np.zeros(1, np.int64), "t")
    cut = split_corpus(corpus, [0.9, 0.05, 0.05], at_boundaries=True)
    for name in ("val", "test"):
        assert cut[name].values[:1].tobytes() != b"\n"
        start = text.find(cut[name].values.tobytes())
        assert text[start - 1 : start] == b"\n"  # a line start: no word is cut
    assert b"".join(c.values.tobytes() for c in cut.values()) == text
    one_line = Corpus(np.frombuffer(b"ab cd ef gh ij kl", np.uint8), np.zeros(1, np.int64), "t")
    cut = split_corpus(one_line, [0.5, 0.25, 0.25], at_boundaries=True)
    assert [c.values.tobytes() for c in cut.values()] == [b"ab cd ef ", b"gh ij ", b"kl"]
    plain = split_corpus(one_line, [0.5, 0.25, 0.25])  # bytes: the fractions exactly
    assert [len(c.values) for c in plain.values()] == [8, 5, 4]


def test_text_blocks_cut_at_documents_and_then_at_lines(monkeypatch) -> None:
    monkeypatch.setattr(data.cache, "BLOCK", 200)  # longer than any line: cuts at line starts
    text = lines_of_words(30).encode()
    starts = np.array([0, 100, 101, 700], dtype=np.int64)
    corpus = Corpus(np.frombuffer(text, np.uint8), starts, "t")
    blocks = list(text_blocks(corpus))
    assert b"".join(b for _, b in blocks) == text
    offsets = np.cumsum([0, *(len(b) for _, b in blocks)])[:-1]
    assert [int(o) for o, (first, _) in zip(offsets, blocks, strict=True) if first] == [
        0,
        100,
        101,
        700,
    ]
    for offset, (first, _) in zip(offsets, blocks, strict=True):
        assert first or text[offset - 1 : offset] == b"\n"


def test_bytes_give_the_same_splits_as_before_and_one_byte_per_token(tmp_path: Path) -> None:
    """The default tokenizer reads the corpus as it always did: the same arrays as
    load_corpus -> split_corpus -> with_targets, so a byte run's figures do not change."""
    cfg = DataConfig(max_bytes=30_000, cache_dir=str(tmp_path / "never"))
    splits = load_splits(cfg, {"train": 4, "val": 4}, 16)
    old = {k: with_targets(v) for k, v in split_corpus(load_corpus(cfg), cfg.split).items()}
    for name in SPLITS:
        assert np.array_equal(splits.parts[name].values, old[name].values)
        assert np.array_equal(splits.parts[name].targets, old[name].targets)
        assert np.array_equal(splits.parts[name].doc_starts, old[name].doc_starts)
    assert splits.spec == DataSpec(
        "tokens",
        256,
        256,
        tokenizer_state={},
        bytes_per_token=dict.fromkeys(SPLITS, 1.0),
        corpus=fingerprint(load_corpus(cfg)),  # the source's identity, for resume and evaluate
    )
    assert not (tmp_path / "never").exists()  # nothing to tokenize, nothing cached


def test_bits_per_byte_is_bits_over_the_bytes_the_tokens_cover() -> None:
    byte_lm = LanguageModelling(DataSpec("tokens", 256, 256, bytes_per_token={"val": 1.0}))
    figures = byte_lm.figures(1.234, "val")
    assert figures["bits_per_byte"] == figures["bpc"] == 1.234 / math.log(2)
    assert "ppl" not in figures and byte_lm.monitor == "bpc"
    state = WordTokenizer(["<unk>", "<eos>", "a"]).state()
    spec = DataSpec(
        "tokens",
        3,
        3,
        tokenizer="word",
        tokenizer_state=state,
        bytes_per_token={"val": 4.0, "test": 5.0},
    )
    word_lm = LanguageModelling(spec)
    val, test = word_lm.figures(2.0, "val"), word_lm.figures(2.0, "test")
    assert val["bits_per_byte"] == pytest.approx(2.0 / math.log(2) / 4.0)
    assert test["bits_per_byte"] == pytest.approx(2.0 / math.log(2) / 5.0)
    assert val["ppl"] == pytest.approx(math.exp(2.0)) and word_lm.monitor == "bits_per_byte"
    assert "bits_per_byte" not in word_lm.figures(2.0, "train")  # no ratio known: no figure


def test_a_checkpoint_spec_of_an_earlier_version_is_the_byte_tokenizer() -> None:
    spec = DataSpec(**{"kind": "tokens", "input_size": 256, "target_size": 256})
    task = LanguageModelling(spec)
    torch.manual_seed(0)
    model = build_model(ModelConfig(embedding_size=8, hidden_size=12), task).eval()
    text = task.generate(model, b"def ", 10, generator=torch.Generator().manual_seed(0))
    assert text.startswith("def ") and task.tokenizer is BYTES


def test_a_tokenizer_file_sets_the_vocabulary_and_is_read_only_at_the_start(
    tmp_path: Path, bpe
) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.state()["json"])
    given = ["data.tokenizer=bpe", f"data.tokenizer_file={path}"]
    assert validate(composed(*given)).data.vocab_size is None
    validate(composed(*given, f"data.vocab_size={bpe.vocab_size}"))
    message = f"data.vocab_size=500: data.tokenizer_file has {bpe.vocab_size} tokens"
    with pytest.raises(ConfigError, match=message):
        validate(composed(*given, "data.vocab_size=500"))
    saved = to_dict(validate(composed(*given)))
    path.unlink()  # a checkpoint's config on another machine: its tokenizer is in the spec
    assert from_dict(saved).data.tokenizer_file == str(path)


def test_a_prompt_of_no_tokens_is_one_line() -> None:
    state = WordTokenizer(["<unk>", "<eos>", "a"]).state()
    task = LanguageModelling(DataSpec("tokens", 3, 3, tokenizer="word", tokenizer_state=state))
    model = build_model(ModelConfig(embedding_size=4, hidden_size=4), task).eval()
    with pytest.raises(DataError, match="prompt=' ' is no tokens for the word tokenizer"):
        task.generate(model, b" ", 5)
    assert task.generate(model, b"a", 5, generator=torch.Generator().manual_seed(0)).startswith("a")


def cached_run(cfg: DataConfig, caplog) -> tuple[data.Splits, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        splits = load_splits(cfg, {"train": 2, "val": 2}, 8)
    return splits, caplog.text


def test_tokens_are_cached_once_and_rebuilt_for_other_settings(tmp_path: Path, caplog) -> None:
    path = write_corpus(tmp_path, lines_of_words(400))
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(path), tokenizer="word", cache_dir=str(cache))
    first, log = cached_run(cfg, caplog)
    assert "word tokenizer fitted on the train split" in log and "tokenized in" in log
    (bin_file,) = (cache / "tokens").glob("*.bin")
    written = bin_file.stat().st_mtime_ns
    again, log = cached_run(cfg, caplog)
    assert "tokenizer from the cache" in log and "tokens from the cache" in log
    assert "fitted" not in log and "tokenized in" not in log  # nothing done twice
    assert bin_file.stat().st_mtime_ns == written
    assert isinstance(again.parts["train"].values, np.memmap)  # read from the file, not copied
    assert again.spec == first.spec
    for name in SPLITS:
        assert np.array_equal(again.parts[name].values, first.parts[name].values)
        assert np.array_equal(again.parts[name].doc_starts, first.parts[name].doc_starts)
    cfg.min_count = 3  # another setting: fitted anew; the same vocabulary, the same tokens
    _, log = cached_run(cfg, caplog)
    assert "fitted" in log and "tokens from the cache" in log
    cfg.vocab_size = 10  # another vocabulary: other tokens
    _, log = cached_run(cfg, caplog)
    assert "fitted" in log and "tokenized in" in log
    assert len(list((cache / "tokens").glob("*.bin"))) == 2
    bin_file.write_bytes(bin_file.read_bytes()[:-2])  # a damaged cache is written again
    cfg.min_count, cfg.vocab_size = 1, None
    damaged, log = cached_run(cfg, caplog)
    assert "incomplete" in log and "tokenized in" in log
    assert np.array_equal(damaged.parts["val"].values, first.parts["val"].values)


def test_long_tokenizing_shows_its_progress(tmp_path: Path, monkeypatch, caplog) -> None:
    """Without a terminal (nohup, SLURM): a log line every PROGRESS_SECONDS while fitting and
    encoding; here every block of 4 KiB."""
    monkeypatch.setattr(data.cache, "BLOCK", 4096)
    monkeypatch.setattr(data.cache, "PROGRESS_SECONDS", 0.0)
    path = write_corpus(tmp_path, lines_of_words(1000))
    cfg = DataConfig(path=str(path), tokenizer="word", cache_dir=str(tmp_path / "cache"))
    _, log = cached_run(cfg, caplog)
    assert "fitting the word tokenizer: " in log and "% of" in log
    lines = [line for line in log.splitlines() if "tokenizing (word): " in line]
    assert len(lines) >= 5 and "100% of" in lines[-1]


def test_a_changed_tokenizer_file_is_another_cache(tmp_path: Path, bpe, caplog) -> None:
    path = write_corpus(tmp_path, lines_of_words(400))
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(bpe.state()["json"])
    cfg = DataConfig(path=str(path), tokenizer="bpe", tokenizer_file=str(tokenizer_file))
    cfg.cache_dir = str(tmp_path / "cache")
    first, _ = cached_run(cfg, caplog)
    assert first.spec.input_size == bpe.vocab_size
    other = BytePairTokenizer.fit([lines_of_words(100, seed=3).encode()], settings(vocab_size=270))
    tokenizer_file.write_text(other.state()["json"])  # the same path, rewritten
    second, log = cached_run(cfg, caplog)
    assert "tokenized in" in log and second.spec.input_size == 270


def test_a_user_tokenizer_plugs_in_by_import_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    path = write_corpus(tmp_path, lines_of_words(200))
    cfg = DataConfig(path=str(path), tokenizer="my_tokenizers:Chars", cache_dir=str(tmp_path))
    splits = load_splits(cfg, {"train": 2}, 8)
    assert splits.spec.tokenizer == "my_tokenizers:Chars"
    again = rebuild(splits.spec.tokenizer, splits.spec.tokenizer_state)
    train = splits.parts["train"]
    assert again.decode(train.values[:30]) == lines_of_words(200)[:30]
    assert "my_tokenizers:Chars" in TOKENIZERS


# A tiny word and BPE model on a small text file, trained as the command line trains it.
TOKENIZED = {
    "word": ["data.tokenizer=word"],
    "bpe": ["data.tokenizer=bpe", "data.vocab_size=300"],
}


@pytest.fixture(scope="module", params=sorted(TOKENIZED))
def tokenized_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    corpus = root / "corpus.txt"
    corpus.write_text(lines_of_words(3000))
    out = root / "run"
    args = ["+debug=tiny", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}"]
    run_in_process(out, *args, *TOKENIZED[request.param])
    return request.param, out, corpus


def test_a_tokenized_run_reports_bits_per_byte_and_perplexity(tokenized_run) -> None:
    name, out, _ = tokenized_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["monitor"] == "val/bits_per_byte"
    assert 0 < summary["val_bits_per_byte"] < summary["val_bpc"]  # a token covers > 1 byte
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    spec = ckpt["hyper_parameters"]["spec"]
    assert spec["tokenizer"] == name and spec["tokenizer_state"]
    for yaml in out.rglob("*.yaml"):  # the vocabulary is in the checkpoint, not in hparams
        assert "tokenizer_state" not in yaml.read_text() and yaml.stat().st_size < 10_000, yaml


def test_evaluate_repeats_the_last_validation(
    tokenized_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    _, out, _ = tokenized_run
    summary = json.loads((out / "summary.json").read_text())
    ckpt = out / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)  # evaluate finds the corpus where training read it
    evaluate.main([f"ckpt={ckpt}", "split=val"])
    result = json.loads(capsys.readouterr().out)
    for key in ("loss", "bpc", "ppl", "bits_per_byte"):
        assert result[key] == pytest.approx(summary[f"val_{key}"], abs=1e-9), key
    evaluate.main([f"ckpt={ckpt}", "split=test"])
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0


def test_sample_needs_only_the_checkpoint(
    tokenized_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    """As on another machine: a fresh folder with the checkpoint alone, the corpus gone."""
    name, out, corpus = tokenized_run
    shutil.copy(out / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    moved = corpus.with_suffix(".moved")
    corpus.rename(moved)
    monkeypatch.chdir(tmp_path)
    try:
        sample.main(["ckpt=model.ckpt", "prompt=the cat", "length=20"])
    finally:
        moved.rename(corpus)
    text = capsys.readouterr().out
    assert text.startswith("the cat")
    words = set(text.split())
    assert words <= {*WORDS, "<unk>"} if name == "word" else len(text) > len("the cat ")


def test_resume_keeps_the_runs_tokenizer(tokenized_run, tmp_path: Path, caplog) -> None:
    """Resumed elsewhere, the tokens come from the checkpoint's tokenizer (no refit) and a
    changed tokenizer setting is refused."""
    name, out, corpus = tokenized_run
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    args = ["+debug=tiny", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    args += [*TOKENIZED[name], "resume=auto", "trainer.max_steps=8"]
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        run_in_process(run, *args)
    assert "fitted" not in caplog.text and "tokenized in" in caplog.text
    change, message = {
        "word": ("data.min_count=2", "data.min_count=1 (now 2)"),
        "bpe": ("data.vocab_size=290", "data.vocab_size=300 (now 290)"),
    }[name]
    with pytest.raises(CheckpointError, match=re.escape(message)):
        run_in_process(run, *args, change)
