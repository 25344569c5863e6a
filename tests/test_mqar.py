"""Multi-query associative recall across TBPTT windows: the corpus, its recall figure, the
experiment (data.source=mqar, python -m seqtrain.recall, +experiment=mqar)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from seqtrain import cli, recall
from seqtrain.data import DataConfig, Streams, load_corpus, split_corpus
from seqtrain.data.synthetic import FILLER, KEYS, VALUES, Mqar
from seqtrain.errors import SeqtrainError
from tests.conftest import composed, refusal, run_in_process

# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0, 1, 3])
def test_values_follow_from_keys_and_queries_fall_gap_windows_after_their_pairs(gap: int) -> None:
    task = Mqar(pairs=3, gap=gap, window=16)
    examples, answers = task.examples(200, seed=1)
    assert examples.shape == (200, (gap + 1) * 16) and answers.shape == (200, 3)
    written = np.arange(6)  # k1 v1 k2 v2 k3 v3
    first = task.queries - gap * 16  # the first window's queries (the scored ones at gap 0)
    assert (written // 16 == 0).all() and (first // 16 == 0).all()
    assert (task.queries // 16 == gap).all() and (task.queries % 16 == first).all()
    for example, answer in zip(examples, answers, strict=True):
        keys, values = example[0:6:2], example[1:6:2]
        assert len(set(keys)) == 3 and set(keys) <= set(KEYS) and set(values) <= set(VALUES)
        memory = dict(zip(keys, values, strict=True))
        for at in (first, task.queries):
            assert sorted(example[at]) == sorted(keys)  # every key queried once
            assert [memory[k] for k in example[at]] == list(example[at + 1])
        assert list(example[task.queries + 1]) == list(answer)
        rest = np.ones(len(example), dtype=bool)
        rest[written] = rest[first] = rest[first + 1] = False
        rest[task.queries] = rest[task.queries + 1] = False
        assert (example[rest] == FILLER).all()
    assert not set(KEYS) & set(VALUES)  # a value is never mistaken for a key


def test_the_corpus_is_whole_examples_that_start_every_stream_on_a_window() -> None:
    cfg = DataConfig(source="mqar", pairs=2, gap=1, window=8, max_bytes=2000, batch_size=3)
    corpus = load_corpus(cfg)
    length = 16  # (gap + 1) windows
    assert (corpus.doc_starts == np.arange(0, len(corpus.values), length)).all()
    streams = Streams(split_corpus(corpus, cfg.split)["train"], 3, 8)
    assert streams.length % length == 0  # every stream starts on an example, so on a window
    resets = streams.resets(0, streams.length)  # (3, L)
    assert (resets.any(0).nonzero()[0] % length == 0).all()
    example = corpus.values[:length]
    assert set(example[:4:2]) <= set(KEYS) and set(example[8 + 4 : 8 + 8 : 2]) <= set(KEYS)


BAD = [
    (dict(window=None), "data.window=None: data.source=mqar needs the TBPTT window"),
    (dict(max_bytes=None), "data.source=mqar needs data.max_bytes"),
    (dict(gap=-1), "data.gap=-1: must be 0 (the same window) or more windows"),
    (dict(pairs=0), "data.pairs=0: must be in 1..26"),
    (dict(pairs=27, window=200), "data.pairs=27: must be in 1..26"),
    (dict(pairs=5), "data.window=16: must hold the pairs and their queries: at least 4 * data"),
]


@pytest.mark.parametrize(("keys", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_mqar_keys_are_one_line(keys: dict, message: str) -> None:
    cfg = DataConfig(**{**dict(source="mqar", window=16, max_bytes=1000), **keys})
    with pytest.raises(SeqtrainError) as err:
        load_corpus(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_mqar_key_on_the_command_line_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = ["seqtrain", "+experiment=mqar", "data.pairs=20", f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr(sys, "argv", argv)
    assert "data.window=32: must hold the pairs" in refusal(cli.main, capsys=capsys)
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# The recall figure
# ---------------------------------------------------------------------------------------------


class Lookup(nn.Module):
    """A hand-made associative memory: stores each key-value pair it reads and, shown a stored key,
    predicts its value; otherwise uniform over VALUES. forget_every: the memory is cleared at every
    window start, as a state that is not carried across windows is."""

    def __init__(self, forget_every: int | None = None) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # recall asks the model for its device
        self.forget_every = forget_every

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = torch.full((*x.shape, 256), -1e4)  # (N, T, V)
        logits[..., list(VALUES)] = 0.0
        for n, row in enumerate(x.tolist()):
            memory: dict[int, int] = {}
            for t, token in enumerate(row):
                if self.forget_every and t % self.forget_every == 0:
                    memory = {}
                if t and row[t - 1] in KEYS and token in VALUES:
                    memory.setdefault(row[t - 1], token)
                if token in memory:
                    logits[n, t, memory[token]] = 30.0
        return logits, None


@pytest.mark.parametrize("gap", [0, 2])
def test_recall_scores_a_perfect_memory_and_chance(gap: int) -> None:
    task = Mqar(pairs=4, gap=gap, window=16)
    perfect = recall.mqar_recall(Lookup(), task, count=32)
    assert perfect["recall_accuracy"] == 1.0 and perfect["recall_bits"] < 1e-6
    forgetful = recall.mqar_recall(Lookup(forget_every=16), task, count=32)
    if gap == 0:  # pairs and queries share a window: no carried state is needed
        assert forgetful["recall_accuracy"] == 1.0
    else:  # the pairs are gone when they are queried: chance, 4 bits
        assert forgetful["recall_bits"] == pytest.approx(4.0) == forgetful["chance_bits"]
        assert forgetful["recall_accuracy"] < 0.2


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def test_the_experiment_queries_one_window_later_at_the_trained_window() -> None:
    from seqtrain.config import validate

    cfg = validate(composed("+experiment=mqar"))
    assert (cfg.data.source, cfg.data.gap, cfg.data.window) == ("mqar", 1, cfg.tbptt.window)
    assert cfg.tbptt.carry and cfg.model.cell == "gdn"
    assert validate(composed("+experiment=mqar", "tbptt.window=48")).data.window == 48


def test_a_shrunk_run_trains_and_recall_reports_its_accuracy(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    summary = run_in_process(run_dir, "+experiment=mqar", "+debug=tiny", "model.num_heads=2")
    assert summary["steps"] == 6
    recall.main([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "examples=16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["pairs"], result["gap"], result["window"]) == (4, 1, 16)
    assert 0 <= result["recall_accuracy"] <= 1 and result["chance_bits"] == 4.0
    assert result["recall_bits"] > 0 and result["examples"] == 16


def test_recall_scores_the_copy_task_as_before_and_refuses_a_run_without_recall(
    tmp_path, capsys
) -> None:
    model = Lookup()
    assert recall.score(model, DataConfig(source="copy", lag=3), 8) == recall.recall(model, 3, 8)
    run_dir, text = tmp_path / "run", tmp_path / "a.txt"
    text.write_text("the cat sat on the mat. " * 400)
    run_in_process(run_dir, "+debug=tiny", f"data.path={text}", "trainer.max_steps=3")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    capsys.readouterr()  # the run's own log lines
    message = refusal(recall.main, [f"ckpt={ckpt}"], capsys=capsys)
    assert "data.source=text has no recall figure; it is for runs of data.source=copy or mqar" in (
        message
    )
