"""The AWD-LSTM recipe: AR/TAR, awd-lstm-lm's variable windows (tbptt.vary), NT-ASGD."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqtrain import evaluate, optim
from seqtrain.checkpoint import config_of, load_model, read, spec_of, task_of
from seqtrain.config import validate
from seqtrain.data import (
    DataConfig,
    DataError,
    Streams,
    VariedSpans,
    Window,
    draw_length,
    load_corpus,
    longest_window,
    split_corpus,
    train_loader,
    with_targets,
)
from seqtrain.evaluate import evaluate_split
from seqtrain.model import ActivationPenalty, ModelConfig
from seqtrain.module import SequenceModule
from seqtrain.tasks import build_model
from seqtrain.tbptt import Engine

from .conftest import (
    BYTE_LM,
    PLUGINS,
    assert_close,
    assert_exact_resume_in_process,
    composed,
    counting_corpus,
    finish,
    read_scalars,
    run_in_process,
    start_run,
    with_pythonpath,
)

# ---------------------------------------------------------------------------------------------
# AR and TAR
# ---------------------------------------------------------------------------------------------


def test_penalty_equals_the_formula_on_a_hand_made_tensor() -> None:
    raw = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [0.0, 1.0]]])  # (B=1, T=3, H=2)
    dropped = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]])
    # AR: 2 * (4 + 1 + 1) / 6 = 2; TAR: the pairs (2, 2) and (-3, 1): 1 * (8 + 10) / 4 = 4.5
    penalty = ActivationPenalty(ar=2.0, tar=1.0)
    assert float(penalty(raw, dropped, None, 3)) == pytest.approx(6.5)
    # The same window as two segments: the shares add up to it, the pair at the cut included.
    first = penalty(raw[:, :2], dropped[:, :2], None, 3)
    second = penalty(raw[:, 2:], dropped[:, 2:], raw[:, 1:2], 3)
    assert float(first + second) == pytest.approx(6.5)
    assert float(ActivationPenalty(0.0, 1.0)(raw[:, :1], dropped[:, :1], None, 1)) == 0.0


def awd_model(dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=8, hidden_size=12, num_layers=2, dropout=dropout)
    return build_model(cfg, BYTE_LM)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("chunk", [None, 4])
def test_penalised_update_equals_the_penalised_loss_of_one_pass(chunk) -> None:
    """Chunk checkpoints and document cuts (the engine's segments) give the gradients of one pass
    over the window with ar * mean(dropped^2) + tar * mean(diff^2) added; the reported loss is
    the cross-entropy alone."""
    model, penalty = awd_model(), ActivationPenalty(ar=2.0, tar=1.0)
    x, y = torch.randint(0, 256, (3, 13)), torch.randint(0, 256, (3, 13))
    resets = torch.zeros(3, 13, dtype=torch.bool)
    resets[1, 6] = True  # a document starts in stream 1: the engine cuts the window there
    start = tuple(torch.randn_like(s) for s in model(x[:, :1])[1])
    engine = Engine(model, BYTE_LM, 13, chunk=chunk, penalty=penalty)
    engine.state = start
    result = engine.train_update(Window(x, y, resets, 1), lambda loss: loss.backward())
    actual = grads(model)

    out = [model.layer_outputs(x[:, :6], start), None]  # by hand: the same cut, one graph
    kept = torch.tensor([True, False, True]).view(1, -1, 1)
    out[1] = model.layer_outputs(x[:, 6:], tuple(s * kept for s in out[0].state))
    raw, dropped = (torch.cat([o[i] for o in out], 1) for i in (0, 1))  # (3, 13, 12)
    cross_entropy = F.cross_entropy(model.predict(dropped).flatten(0, 1), y.flatten())
    ar = 2.0 * dropped.square().mean()
    tar = 1.0 * (raw[:, 1:] - raw[:, :-1]).square().mean()
    (cross_entropy + ar + tar).backward()
    for name, g in grads(model).items():
        assert_close(actual[name], g, name, 1e-6)
    assert result.loss == pytest.approx(cross_entropy.item(), abs=1e-6)  # no penalty in it


def test_penalty_changes_gradients_not_the_reported_loss_and_is_off_at_eval() -> None:
    x, y = torch.randint(0, 256, (2, 10)), torch.randint(0, 256, (2, 10))
    w = Window(x, y, torch.zeros(2, 10, dtype=torch.bool), 0)
    results, gradients, evals = [], [], []
    for penalty in (None, ActivationPenalty(ar=2.0, tar=1.0)):
        model = awd_model(dropout=0.2)  # the same weights and masks each time
        torch.manual_seed(1)
        engine = Engine(model, BYTE_LM, 10, penalty=penalty)
        results.append(engine.train_update(w, lambda loss: loss.backward()).loss)
        gradients.append(grads(model))
        model.eval()
        evals.append(engine.eval_window(w))
        assert float(engine.run(x, y, w.resets, None).penalty) == 0.0  # only when asked for
    assert results[0] == results[1]
    assert evals[0] == evals[1]
    assert not torch.equal(gradients[0]["rnn.weight_hh_l1"], gradients[1]["rnn.weight_hh_l1"])


def test_penalty_is_on_the_new_steps_only_with_history() -> None:
    """TBPTT(k1, k2): the steps re-run as history carry no loss, and no penalty either."""
    model, penalty = awd_model(), ActivationPenalty(ar=2.0, tar=1.0)
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    resets = torch.zeros(2, 12, dtype=torch.bool)
    out = Engine(model, BYTE_LM, 12, stride=5, penalty=penalty).run(
        x, y, resets, None, loss_from=7, penalize=True
    )
    raw, dropped, _ = model.layer_outputs(x)
    expected = penalty(raw[:, 7:], dropped[:, 7:], None, 5)
    assert_close(out.penalty, expected, "penalty of the 5 new steps", 1e-6)


# ---------------------------------------------------------------------------------------------
# tbptt.vary
# ---------------------------------------------------------------------------------------------


def test_drawn_lengths_follow_awd_lstm_lm_rule() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([draw_length(rng, 70) for _ in range(20000)])
    assert lengths.min() >= 5 and lengths.max() <= longest_window(70) == 85
    assert abs(lengths.mean() - (0.95 * 70 + 0.05 * 35 - 0.5)) < 0.3  # int() drops ~0.5 a draw
    near_half = np.mean(lengths < 52)  # N(35, 5) below 52, N(70, 5) essentially never
    assert 0.04 < near_half < 0.06
    assert abs(np.std(lengths[lengths >= 52]) - 5) < 0.2
    short = [draw_length(rng, 10) for _ in range(2000)]  # N(5, 5) is often cut at 5
    assert min(short) == 5


def test_varied_spans_cover_every_step_in_order_and_resume_from_a_cursor() -> None:
    spans = VariedSpans(length=500, window=20, seed=7)
    served = [s for s, _ in zip(spans, range(120), strict=False)]  # ~4.7 epochs
    epochs, current = [], []
    for start, stop, index in served:
        if index == 0 and current:
            epochs.append(current)
            current = []
        assert index == len(current) and start == (current[-1][1] if current else 0)
        current.append((start, stop))
    assert len(epochs) >= 4
    for epoch in epochs:  # each step once, in order, the last window cut at the stream's end
        assert epoch[-1][1] == 500 and all(a < b for a, b in epoch)
    assert len({tuple(e) for e in epochs}) == len(epochs)  # the draws go on: other cuts each time
    resumed = VariedSpans(length=500, window=20, seed=7, start=57)
    assert [s for s, _ in zip(resumed, range(63), strict=False)] == served[57:]


def test_varied_windows_carry_the_state_exactly() -> None:
    """Streams read by varied spans: per stream no gap and no overlap, and the carried state
    after each update is that of one pass over everything read so far."""
    streams = Streams(counting_corpus(2 * 300 + 1), batch_size=2, stride=20)
    windows = [w for w, _ in zip(train_loader(streams, vary_seed=3), range(20), strict=False)]
    lengths = [w.inputs.shape[1] for w in windows]
    assert len(set(lengths[:-1])) > 3 and sum(lengths) > 300  # varied, and past the epoch's end
    first_epoch = windows[: next(i for i, w in enumerate(windows[1:], 1) if w.index == 0)]
    seen = torch.cat([w.inputs for w in first_epoch], 1)  # (2, 300)
    whole = streams.inputs.runs(streams.starts, streams.length)  # (2, 300): each stream whole
    assert torch.equal(seen, torch.from_numpy(whole).long())  # positions 0..299, in order
    model = awd_model()
    model.eval()  # no dropout: the states can be compared with one pass
    engine = Engine(model, BYTE_LM, 20)
    read_so_far = 0
    for w in first_epoch:
        engine.train_update(w, lambda loss: None)
        read_so_far += w.inputs.shape[1]
        _, expected = model(torch.from_numpy(whole[:, :read_so_far]).long())
        for carried, one_pass in zip(engine.state, expected, strict=True):
            assert_close(carried, one_pass, f"state after {read_so_far} steps", 1e-5)


def test_a_varied_step_scales_the_rate_for_that_step_only() -> None:
    cfg = validate(composed("+debug=tiny", "tbptt.vary=true", "optim=sgd"))
    module = SequenceModule.from_config(cfg, BYTE_LM.spec)
    tokens = torch.zeros(4, 12, dtype=torch.long)
    window = Window(tokens, tokens, torch.zeros(4, 12, dtype=torch.bool), 3)
    assert module.lr_scale(window) == 12 / 16
    p = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1 / (step + 1))
    p.grad = torch.ones(3)
    with optim.scaled_lr(sgd, 0.75):
        sgd.step()
    assert torch.equal(p.detach(), torch.full((3,), 1 - 0.5 * 0.75))
    assert sgd.param_groups[0]["lr"] == 0.5  # restored exactly
    schedule.step()
    assert sgd.param_groups[0]["lr"] == 0.25  # the schedule as it was


def test_vary_resumes_exactly(tmp_path) -> None:
    """Stopped by SIGTERM and resumed: every step's loss equals the uninterrupted run's, over an
    epoch's end (4,000 bytes: about 55 varied windows an epoch) with AR, TAR and dropout on."""
    args = ["+debug=tiny", "data.max_bytes=4000", "trainer.max_steps=70"]
    args += ["trainer.val_check_interval=35", "trainer.sample_length=0", "tbptt.vary=true"]
    args += ["model.ar=2", "model.tar=1", "model.dropout=0.3", "model.variational=true"]
    runs = assert_exact_resume_in_process(tmp_path, args)
    assert runs["resumed"]["val_bpc"] == runs["reference"]["val_bpc"]
    assert runs["reference"]["tokens"] != 70 * 4 * 16  # the windows were varied


# ---------------------------------------------------------------------------------------------
# NT-ASGD: optim.average=nt
# ---------------------------------------------------------------------------------------------


def first_start(losses: list[float], nonmono: int) -> int | None:
    """The pass (0-based) at which the weight average starts, or None."""
    average, model = optim.WeightAverage(optim.non_monotonic, nonmono), torch.nn.Linear(1, 1)
    for i, loss in enumerate(losses):
        if average.validated(loss, i, model):
            return i
    return None


def test_non_monotonic_rule_on_contrived_validation_sequences() -> None:
    improving = [5.0, 4.0, 3.0, 2.5, 2.0, 1.9, 1.8, 1.7, 1.6]
    assert first_start(improving, 5) is None
    # Best 2.0 at pass 1, not beaten by the 5 passes after it (2..6): pass 7 is worse than the
    # best before the last 5 earlier passes, and averaging starts there; with nonmono 2 at pass 4.
    flat = [3.0, 2.0, 2.1, 2.2, 2.05, 2.3, 2.1, 2.2]
    assert first_start(flat, 5) == 7
    assert first_start(flat, 2) == 4
    assert first_start([3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 5) is None  # equal is no worse
    assert first_start([1.0] + [2.0] * 5, 5) is None  # too few passes before the last 5


def test_the_average_is_the_mean_of_the_weights_after_each_update() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    average = optim.WeightAverage(lambda losses, nonmono: True, 5)
    with torch.no_grad():
        model.weight.fill_(7.0)
    assert average.validated(1.0, 10, model) and average.started_at == 10
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
    raw = model.weight.detach().clone()
    with average.applied(model):
        assert torch.equal(model.weight.detach(), torch.full((1, 2), 3.0))  # (1 + 2 + 6) / 3
    assert torch.equal(model.weight.detach(), raw)  # training weights back, bit for bit
    copy = optim.WeightAverage(optim.non_monotonic, 5)
    copy.load_state_dict(average.state_dict(), model)
    assert copy.state_dict()["count"] == 3 and copy.losses == [1.0] and copy.started_at == 10
    assert torch.equal(copy.mean["weight"], average.mean["weight"])


def test_ntasgd_is_awd_lstm_lm_settings() -> None:
    o = validate(composed("optim=ntasgd")).optim
    assert o.optimizer == {"_target_": "torch.optim.SGD", "_partial_": True}  # no momentum
    assert (o.lr, o.weight_decay, o.grad_clip, o.average, o.nonmono) == (30, 1.2e-6, 0.25, "nt", 5)
    sgd, schedule = optim.build(o, torch.nn.Linear(2, 2))
    rates = []
    for _ in range(50):
        rates.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    assert rates == [30.0] * 50  # constant: no warmup, no decay


NTASGD = ["+debug=tiny", "optim=ntasgd", "optim.nonmono=1", "trainer.val_check_interval=2"]
NTASGD += ["trainer.sample_length=0", "model.dropout=0.2", "model.variational=true"]


@pytest.fixture(scope="module")
def switched(tmp_path_factory) -> Path:
    """A run whose validation stops improving: averaging starts well before its end."""
    run_dir = tmp_path_factory.mktemp("ntasgd")
    run_in_process(run_dir, *NTASGD, "trainer.max_steps=24")
    return run_dir


def switch_step(run_dir: Path) -> int:
    averaging = read_scalars(run_dir, "optim/averaging")
    return min(step for step, on in averaging.items() if on == 1.0)


def test_evaluation_reads_the_averaged_weights(switched, capsys) -> None:
    assert switch_step(switched) <= 16  # then averaged over 8 updates or more
    summary = json.loads((switched / "summary.json").read_text())
    ckpt_path = switched / "checkpoints" / "last.ckpt"
    evaluate.main([f"ckpt={ckpt_path}", "split=val"])
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert loss == pytest.approx(summary["val_loss"], abs=1e-6)
    # The training weights alone give another figure: evaluate read the average.
    ckpt = read(ckpt_path)
    cfg = config_of(ckpt)
    ckpt["seqtrain"]["average"] = None
    val = with_targets(split_corpus(load_corpus(cfg.data), cfg.data.split)["val"])
    streams = Streams(val, cfg.data.eval_batch_size, cfg.tbptt.window)
    with torch.inference_mode():
        raw = load_model(ckpt, cfg)
        raw_loss = evaluate_split(raw, task_of(ckpt, cfg), streams, cfg.tbptt.window, "val", False)
    assert abs(raw_loss["loss"] - summary["val_loss"]) > 1e-4


def test_ntasgd_resumes_exactly_before_the_switch(tmp_path) -> None:
    runs = assert_exact_resume_in_process(tmp_path, [*NTASGD, "trainer.max_steps=24"])
    assert runs["resumed"]["val_loss"] == runs["reference"]["val_loss"]


def test_ntasgd_resumes_exactly_after_the_switch(switched, tmp_path) -> None:
    """Stopped 4 updates after averaging started (trainer.max_steps there), then trained on to
    the end: the losses, validation figures and the average equal the uninterrupted run's."""
    stop = switch_step(switched) + 4  # a validation step: the stop adds no validation
    run_dir = tmp_path / "stopped"
    run_in_process(run_dir, *NTASGD, f"trainer.max_steps={stop}")
    assert read(run_dir / "checkpoints" / "last.ckpt")["seqtrain"]["average"]["count"] == 4
    run_in_process(run_dir, *NTASGD, "trainer.max_steps=24", "resume=auto")
    for tag in ("train/loss", "val/loss", "optim/averaging"):
        assert read_scalars(run_dir, tag) == read_scalars(switched, tag), tag
    ours, theirs = (read(d / "checkpoints" / "last.ckpt") for d in (run_dir, switched))
    assert ours["seqtrain"]["average"]["losses"] == theirs["seqtrain"]["average"]["losses"]
    for name, mean in theirs["seqtrain"]["average"]["mean"].items():
        assert torch.equal(ours["seqtrain"]["average"]["mean"][name], mean), name


def test_the_awd_recipe_trains_a_byte_lm(tmp_path) -> None:
    summary = run_in_process(
        tmp_path,
        "+debug=tiny",
        "trainer.max_steps=20",
        "trainer.val_check_interval=5",
        "optim=ntasgd",
        "tbptt.vary=true",
        "model.ar=2",
        "model.tar=1",
        "model.weight_drop=0.5",
        "model.variational=true",
        "model.dropout=0.4",
    )
    assert summary["steps"] == 20 and summary["skipped_steps"] == 0
    # Untrained, the model scores 8.0 (a uniform guess over 256 bytes); these 20 updates reach
    # 5.66. A recipe that did not learn (a lost gradient, a diverging rate) stays near 8.
    assert summary["val_bpc"] < 6.5


@pytest.mark.slow
def test_two_ranks_vary_and_average_like_one_process(tmp_path) -> None:
    """DDP: every rank draws the same lengths and scales its step alike, and the ranks start
    averaging at the same pass; 2 ranks x 2 streams train like 1 process x 4, step by step."""
    args = [*NTASGD, "optim.lr=1", "tbptt.vary=true", "model.ar=2", "model.tar=1"]
    args += ["model.dropout=0"]  # each rank draws its own masks: no dropout to compare
    args += ["trainer.accelerator=cpu", "trainer.max_steps=24"]
    args += ["optim.average=my_rules:from_second_pass"]  # a user's rule, by import path
    ranks = {"one": ["trainer.devices=1", "data.batch_size=4", "data.eval_batch_size=4"]}
    ranks["two"] = ["trainer.devices=2", "data.batch_size=2", "data.eval_batch_size=2"]
    env = {**with_pythonpath(PLUGINS), "OMP_NUM_THREADS": "1"}
    for name, extra in ranks.items():
        code, _, err = finish(start_run(tmp_path / name, [*args, *extra], env))
        assert code == 0, err[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    a, b = read_scalars(one, "train/loss"), read_scalars(two, "train/loss")
    assert sorted(a) == sorted(b) and len(a) == 24
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    assert read_scalars(one, "optim/averaging") == read_scalars(two, "optim/averaging")
    assert read_scalars(one, "optim/averaging")[4] == 1.0  # from the second pass on
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["tokens"] == s2["tokens"] != 24 * 4 * 16  # the same varied windows
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], abs=1e-5)


def test_pydoc_topics_are_english_documents_every_python_carries() -> None:
    from pydoc_data.topics import topics

    corpus = load_corpus(DataConfig(source="pydoc"))
    names = sorted(topics)
    assert len(corpus.doc_starts) == len(names)  # one document per topic, in name order
    first = bytes(corpus.values[: corpus.doc_starts[1]])
    assert first == topics[names[0]].encode()
    assert b" the " in bytes(corpus.values)  # prose, not code


def test_a_python_without_pydoc_data_gets_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # as if stripped: ImportError
    with pytest.raises(DataError, match=r"^data.source=pydoc: this Python has no pydoc_data"):
        load_corpus(DataConfig(source="pydoc"))


def test_the_word_lm_experiment_trains(tmp_path) -> None:
    """`+experiment=word_lm`, shrunk: the word tokenizer on pydoc topics, tied weights, AR/TAR,
    varied windows and NT-ASGD together; word models report perplexity and bits per byte."""
    small = ["model.embedding_size=32", "model.hidden_size=32", "trainer.max_steps=8"]
    summary = run_in_process(
        tmp_path / "run",
        "+experiment=word_lm",
        *small,
        "trainer.val_check_interval=4",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert summary["steps"] == 8 and summary["monitor"] == "val/bits_per_byte"
    spec = spec_of(read(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert spec.tokenizer == "word" and 1000 < spec.input_size < 8000
    assert summary["val_ppl"] < spec.input_size  # better than a uniform guess
    assert 0 < summary["val_bits_per_byte"] < 8
