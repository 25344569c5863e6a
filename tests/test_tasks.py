"""Tasks as plug-ins: the regression task through the engine, the series data it reads, the
Mackey-Glass source, its figures, the command line end to end, exact resume, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqtrain import cli, evaluate, sample, train
from seqtrain.checkpoint import read, upgrade_hyper_parameters
from seqtrain.config import validate
from seqtrain.data import (
    DataConfig,
    DataSpec,
    Streams,
    Window,
    describe,
    load_corpus,
    split_corpus,
    with_targets,
)
from seqtrain.data.synthetic import mackey_glass
from seqtrain.errors import ConfigError, DataError
from seqtrain.model import ModelConfig
from seqtrain.tasks import Regression, build_model, build_task
from seqtrain.tbptt import Engine

from .conftest import (
    PLUGINS,
    ROOT,
    assert_close,
    assert_exact_resume_in_process,
    composed,
    read_scalars,
    refusal,
    run_in_process,
)

# A seconds-long +experiment=series: a short series, a small model, a few validations.
SERIES = [
    "+experiment=series",
    "data.length=3000",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "model.hidden_size=16",
    "model.embedding_size=4",
    "tbptt.window=20",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.checkpoint_every=20",
    "trainer.log_every_n_steps=1",
]


def regression(features: int = 3, targets: int = 2, variance: float = 2.0) -> Regression:
    return Regression(DataSpec("series", features, targets, variance))


def series_model(task: Regression):
    torch.manual_seed(0)
    return build_model(ModelConfig(embedding_size=8, hidden_size=12, num_layers=2), task)


def float_window(B: int, T: int, index: int, seed: int) -> Window:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, generator=g)  # (B, T, F)
    y = torch.randn(B, T, 2, generator=g)  # (B, T, K)
    return Window(x, y, torch.zeros(B, T, dtype=torch.bool), index)


# --- the engine with a regression task ---------------------------------------------------------


def test_regression_update_loss_is_the_mse_and_the_state_is_carried() -> None:
    task = regression()
    model = series_model(task)
    engine = Engine(model, task, window=10)
    first, second = float_window(2, 10, 0, 1), float_window(2, 10, 1, 2)
    result = engine.train_update(first, lambda loss: loss.backward())
    out, state = model(first.inputs)  # (B, T, K)
    assert abs(result.loss - F.mse_loss(out, first.targets).item()) < 1e-6
    assert result.tokens == 2 * 10  # positions, not target elements
    assert_close(engine.state[0], state[0], "carried h", 1e-6)
    result = engine.train_update(second, lambda loss: loss.backward())
    out, _ = model(second.inputs, state)  # from the carried state, not from zero
    assert abs(result.loss - F.mse_loss(out, second.targets).item()) < 1e-6


def test_regression_tbptt_k1_k2_puts_the_loss_on_the_new_positions_only() -> None:
    k1, k2 = 4, 10
    task = regression()
    model = series_model(task)
    engine = Engine(model, task, window=k2, stride=k1)
    for i in range(5):
        w = float_window(2, k1, i, 10 + i)
        state_before, history = engine.state, engine.history
        result = engine.train_update(w, lambda loss: loss.backward())
        hx = torch.cat([history[0], w.inputs], 1) if history is not None else w.inputs
        hy = torch.cat([history[1], w.targets], 1) if history is not None else w.targets
        assert hx.shape[1] == min(k2, (i + 1) * k1)  # k2 - k1 steps of history, then the new
        out, _ = model(hx, state_before)
        expected = F.mse_loss(out[:, -k1:], hy[:, -k1:])
        assert abs(result.loss - expected.item()) < 1e-6, f"update {i}"


def test_eval_counts_target_elements_and_chunks_change_nothing() -> None:
    task = regression()
    model = series_model(task).eval()
    w = float_window(3, 12, 0, 5)
    total, count = Engine(model, task, window=12).eval_window(w)
    assert count == 3 * 12 * 2
    chunked, _ = Engine(model, task, window=12, chunk=4).eval_window(w)
    assert abs(total - chunked) < 1e-5


# --- data: the Mackey-Glass source and .npy series ----------------------------------------------


def test_mackey_glass_is_deterministic_bounded_and_aperiodic() -> None:
    x = mackey_glass(4000)
    assert np.array_equal(x, mackey_glass(4000))
    assert x.min() > 0.2 and x.max() < 1.5  # the attractor's range
    z = (x - x.mean()) / x.std()
    lags = np.arange(1, 1000)
    acf = np.array([np.mean(z[:-k] * z[k:]) for k in lags])
    assert acf[0] > 0.95  # smooth from one sample to the next
    assert acf[20:].max() < 0.9  # yet it never comes back to itself: not periodic
    corpus = load_corpus(DataConfig(source="mackey_glass", length=4000))
    assert corpus.values.shape == (4000, 1) and corpus.values.dtype == np.float32
    assert abs(float(corpus.values.mean())) < 1e-5 and abs(float(corpus.values.std()) - 1) < 1e-4


def save(tmp: Path, name: str, array: np.ndarray) -> str:
    np.save(tmp / name, array)
    return str(tmp / name)


def test_npy_targets_are_the_next_rows_chosen_columns(tmp_path) -> None:
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)  # row t = [3t, 3t+1, 3t+2]
    cfg = DataConfig(source="series", path=save(tmp_path, "s.npy", rows), target_columns=[2, 0])
    paired = with_targets(load_corpus(cfg), cfg.target_columns)
    assert np.array_equal(paired.values, rows[:-1])
    assert np.array_equal(paired.targets, rows[1:][:, [2, 0]])
    streams = Streams(paired, batch_size=3, stride=2)
    w = streams[0]
    assert w.inputs.shape == (3, 2, 3) and w.targets.shape == (3, 2, 2)
    assert w.inputs.dtype == w.targets.dtype == torch.float32
    assert torch.equal(w.targets[1, 0], torch.tensor([14.0, 12.0]))  # stream 1 starts at row 3
    spec = describe(paired)
    assert (spec.kind, spec.input_size, spec.target_size) == ("series", 3, 2)


def test_a_separate_target_array_is_used_aligned(tmp_path) -> None:
    rows = np.random.default_rng(0).normal(size=(12, 2))
    targets = np.random.default_rng(1).normal(size=(12, 1))
    starts = np.array([5], dtype=np.int64)
    cfg = DataConfig(
        source="series",
        path=save(tmp_path, "x.npy", rows),
        target_path=save(tmp_path, "y.npy", targets),
        doc_starts_path=save(tmp_path, "d.npy", starts),
    )
    corpus = load_corpus(cfg)
    assert corpus.doc_starts.tolist() == [0, 5]
    paired = with_targets(corpus)
    assert len(paired.values) == 12  # no row is lost to a shift
    assert np.allclose(paired.targets, targets.astype(np.float32))
    streams = Streams(paired, batch_size=1, stride=12)
    assert streams[0].resets[0].nonzero().flatten().tolist() == [0, 5]


def test_nmse_of_predicting_the_previous_value_matches_the_tasks_figure() -> None:
    corpus = load_corpus(DataConfig(source="mackey_glass", length=3000))
    splits = {k: with_targets(v) for k, v in split_corpus(corpus, [0.8, 0.1, 0.1]).items()}
    task = build_task(_cfg("regression"), describe(splits["train"]))
    val = splits["val"]
    mse = float(np.mean((val.values - val.targets) ** 2))  # predict x(t+1) = x(t)
    variance = float(splits["train"].targets.astype(np.float64).var())
    figures = task.metrics(mse)
    assert figures["mse"] == mse
    assert abs(figures["nmse"] - mse / variance) < 1e-12
    assert 0.001 < figures["nmse"] < 0.1  # persistence is good on a smooth series, not perfect


def _cfg(name: str):
    return validate(composed(f"task={name}")).task


def test_task_and_data_kind_must_agree() -> None:
    with pytest.raises(DataError, match="task.name=regression trains on series data"):
        build_task(_cfg("regression"), DataSpec("tokens", 256, 256))
    with pytest.raises(DataError, match="use task=regression"):
        build_task(_cfg("lm"), DataSpec("series", 1, 1, 1.0))


# --- checkpoints ---------------------------------------------------------------------------------


def test_old_checkpoints_with_only_a_vocabulary_become_byte_lm_specs() -> None:
    old = {"config": {}, "vocab_size": 256}
    assert upgrade_hyper_parameters(old) == {
        "config": {},
        "spec": {"kind": "tokens", "input_size": 256, "target_size": 256},
    }


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("series")
    run_in_process(out, *SERIES)
    return out


def test_series_experiment_writes_mse_and_nmse_and_evaluates(series_run: Path, capsys) -> None:
    summary = json.loads((series_run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["monitor"] == "val/nmse"
    assert summary["val_mse"] == summary["val_loss"]
    assert 0 < summary["val_nmse"] < 1  # better than predicting the mean
    assert "val_bpc" not in summary
    assert summary["best_checkpoint"].endswith("best.ckpt")
    for tag in ("train/loss", "train/mse", "train/nmse", "val/mse", "val/nmse"):
        assert read_scalars(series_run, tag), tag
    ckpt = read(series_run / "checkpoints" / "last.ckpt")
    spec = ckpt["hyper_parameters"]["spec"]
    assert spec["kind"] == "series" and spec["input_size"] == spec["target_size"] == 1
    evaluate.main([f"ckpt={series_run / 'checkpoints' / 'last.ckpt'}"])
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["mse"] > 0 and result["nmse"] > 0
    assert abs(result["nmse"] - result["mse"] / spec["target_variance"]) < 1e-9


def test_sampling_a_regression_checkpoint_is_one_line(series_run: Path, capsys) -> None:
    args = [f"ckpt={series_run / 'checkpoints' / 'last.ckpt'}"]
    assert "sampling is for language models" in refusal(sample.main, args, capsys=capsys)


def test_regression_resume_after_sigterm_is_exact(tmp_path) -> None:
    run = [*SERIES, "model.dropout=0.1", "trainer.max_steps=60"]  # dropout: the RNG must match
    runs = assert_exact_resume_in_process(tmp_path, run)
    assert runs["resumed"]["val_nmse"] == runs["reference"]["val_nmse"]


# --- bad input: one line, exit 2 -----------------------------------------------------------------

BAD = [
    ("npy missing", lambda t: ["data.path=/no/such.npy"], "data.path=/no/such.npy: no such file"),
    (
        "npy not 2-D",
        lambda t: [f"data.path={save(t, 'v.npy', np.zeros(50, np.float32))}"],
        "has shape (50,); pass a 2-D array",
    ),
    (
        "npy integers",
        lambda t: [f"data.path={save(t, 'i.npy', np.zeros((50, 2), np.int64))}"],
        "holds int64 values; pass floating-point numbers",
    ),
    (
        "npy NaN",
        lambda t: [f"data.path={save(t, 'n.npy', np.full((500, 2), np.nan, np.float32))}"],
        "holds NaN or infinite values",
    ),
    (
        "target column out of range",
        lambda t: [
            f"data.path={save(t, 'ok.npy', np.ones((500, 2), np.float32))}",
            "data.target_columns=[2]",
        ],
        "data.target_columns=[2]: the targets have 2 columns; choose indices in 0..1",
    ),
    (
        "target array of another length",
        lambda t: [
            f"data.path={save(t, 'ok.npy', np.ones((500, 2), np.float32))}",
            f"data.target_path={save(t, 'y.npy', np.ones((499, 1), np.float32))}",
        ],
        "has 499 rows but data.path has 500",
    ),
    (
        "unknown task",
        lambda t: ["task.name=nosuch"],
        "task.name=nosuch: choose from lm, regression",
    ),
]


@pytest.mark.parametrize(("name", "args", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_series_input_is_one_line(tmp_path, monkeypatch, capsys, name, args, message) -> None:
    run_dir = tmp_path / "run"
    base = ["+experiment=series", "data.source=series", "data.length=null", "tbptt.window=4"]
    base += ["data.batch_size=1", "data.eval_batch_size=1"]
    argv = ["seqtrain", *base, *args(tmp_path), f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr(sys, "argv", argv)
    assert message in refusal(cli.main, capsys=capsys)
    assert not (run_dir / ".hydra").exists() and not (run_dir / "checkpoints").exists()


def test_text_samples_need_a_task_that_generates_text() -> None:
    cfg = validate(composed("+experiment=series", "trainer.sample_length=10"))
    with pytest.raises(ConfigError, match="trainer.sample_length=10: task.name=regression"):
        train.prepare(cfg, ROOT / "never-written")


# --- a user's own task, plugged in by import path -----------------------------------------------


def test_a_user_task_plugs_in_by_import_path(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))  # as PYTHONPATH puts a user's module there
    summary = run_in_process(tmp_path, *SERIES, "task.name=my_tasks:MeanAbsolute")
    assert summary["monitor"] == "val/mae" and summary["val_mae"] == summary["val_loss"] > 0
