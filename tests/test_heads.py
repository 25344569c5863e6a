"""Heads over a vocabulary: a tied head is the embedding's one tensor through training, checkpoints,
resume, evaluation and sampling; the adaptive softmax's loss is the exact NLL of its distribution,
and it trains, evaluates and samples from the command line."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch

from seqtrain import evaluate, heads, optim, sample
from seqtrain.checkpoint import check_resumable, config_of, load_model, read, spec_of
from seqtrain.config import ConfigError, validate
from seqtrain.data import BYTES, DataSpec
from seqtrain.errors import CheckpointError
from seqtrain.model import ModelConfig
from seqtrain.recall import recall
from seqtrain.tasks import LanguageModelling, build_model

from .conftest import (
    BYTE_LM,
    PLUGINS,
    assert_close,
    assert_exact_resume_in_process,
    composed,
    run_in_process,
)

V = BYTES.vocab_size
TINY = ["+debug=tiny", "trainer.log_every_n_steps=1"]
TIED = [*TINY, "model.tie_weights=true", "model.embedding_size=16"]  # E = H = 16
# 1000 ids from a Zipf law (tests/plugins/random_tokens.py): a tokenizer's vocabulary, no text.
ZIPF = [
    *TINY,
    "data.source=random_tokens:zipf_1000",
    "trainer.sample_length=0",  # ids above 255 are not bytes: text samples need a tokenizer
    "model.head=adaptive",
    "model.cutoffs=[100,500]",
    "model.hidden_size=32",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "optim.lr=0.01",
]


def lm_model(**options: object):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=16, hidden_size=16, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return build_model(cfg, BYTE_LM)


def batch(b: int = 3, t: int = 10, vocab: int = V) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (b, t), generator=g)  # (B, T)
    return x, torch.randint(0, vocab, (b, t), generator=g)  # (B, T)


def summed_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    outputs, _ = model(x)
    return BYTE_LM.loss(outputs, y)


# --- tied weights ---------------------------------------------------------------------------------


def test_a_tied_head_is_the_embedding_tensor_and_saves_v_times_e_parameters() -> None:
    tied, untied = lm_model(tie_weights=True), lm_model()
    assert tied.head.weight is tied.embedding.weight
    assert [n for n, _ in tied.named_parameters()].count("embedding.weight") == 1
    assert "head.weight" not in dict(tied.named_parameters())
    count = sum(p.numel() for p in tied.parameters())
    assert count == sum(p.numel() for p in untied.parameters()) - V * 16


def test_the_tied_tensor_gets_the_gradients_of_both_uses() -> None:
    tied = lm_model(tie_weights=True)
    untied = lm_model()
    untied.load_state_dict(tied.state_dict())  # the same numbers in two separate tensors
    x, y = batch()
    summed_loss(tied, x, y).backward()
    summed_loss(untied, x, y).backward()
    both = untied.embedding.weight.grad + untied.head.weight.grad
    assert untied.embedding.weight.grad.abs().sum() > 0 and untied.head.weight.grad.abs().sum() > 0
    assert_close(tied.embedding.weight.grad, both, "tied gradient", 1e-5)


def test_the_optimizer_sees_the_tied_tensor_once() -> None:
    tied = lm_model(tie_weights=True)
    optimizer, _ = optim.build(validate({}).optim, tied)
    given = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(given) == len({id(p) for p in given}) == len(list(tied.parameters()))


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        ([], "set model.proj_size=64"),  # E 64 < H 512: nn.LSTM's projection makes it fit
        (["model.cell=gru"], "set model.embedding_size=512"),  # no projection for a GRU
        (["model.block=residual"], "set model.embedding_size=512"),  # a block keeps its width
        (["model.proj_size=32"], "the head's input (model.proj_size=32)"),
        (["model.embedding_size=1024"], "set model.embedding_size=512"),  # E > H
    ],
)
def test_a_tie_of_different_sizes_is_one_line_naming_the_fix(overrides, fix) -> None:
    with pytest.raises(ConfigError, match=r"^model.tie_weights=true: the head's input") as err:
        validate(composed("model.tie_weights=true", *overrides))
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_a_projection_as_wide_as_the_embedding_ties() -> None:
    cfg = validate(composed("model.tie_weights=true", "model.proj_size=64")).model
    model = build_model(cfg, BYTE_LM)
    assert model.head.weight is model.embedding.weight and model.head.in_features == 64


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tied")
    run_in_process(out, *TIED)
    return out


def test_a_tied_checkpoint_loads_tied_and_evaluates_as_training_validated(
    tied_run: Path, capsys
) -> None:
    ckpt = read(tied_run / "checkpoints" / "last.ckpt")
    weights = ckpt["state_dict"]
    assert torch.equal(weights["model.head.weight"], weights["model.embedding.weight"])
    model = load_model(ckpt, config_of(ckpt))
    assert model.head.weight is model.embedding.weight  # loading copies into the one tensor
    # Adam's state: one entry per distinct parameter, the tied one included once
    assert len(ckpt["optimizer_states"][0]["state"]) == len(list(model.parameters()))
    summary = json.loads((tied_run / "summary.json").read_text())
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    ckpt_arg = f"ckpt={tied_run / 'checkpoints' / 'last.ckpt'}"
    evaluate.main([ckpt_arg, "split=val"])
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(
        summary["val_loss"], rel=1e-9
    )
    sample.main([ckpt_arg, "prompt=def ", "length=20"])
    assert capsys.readouterr().out.startswith("def ")


def test_a_checkpoint_from_before_the_head_keys_resumes_as_their_defaults(tied_run) -> None:
    """A key the checkpoint's version lacked had its default's effect: equal to the run's, it
    resumes; different (the run ties, the old model could not have), it is refused."""
    ckpt = read(tied_run / "checkpoints" / "last.ckpt")
    cfg, spec, model = config_of(ckpt), spec_of(ckpt), ckpt["hyper_parameters"]["config"]["model"]
    del model["head"], model["cutoffs"]
    check_resumable(ckpt, cfg, spec, tied_run)
    del model["tie_weights"]
    with pytest.raises(CheckpointError, match=r"model.tie_weights=False \(now True\)"):
        check_resumable(ckpt, cfg, spec, tied_run)


def test_a_tied_run_resumes_exactly(tmp_path) -> None:
    """Were the tie lost on loading, the two copies would part at the first update after it."""
    runs = assert_exact_resume_in_process(tmp_path, [*TIED, "trainer.max_steps=10"])
    assert runs["resumed"]["val_loss"] == runs["reference"]["val_loss"]


# --- the adaptive softmax -------------------------------------------------------------------------


def test_the_adaptive_loss_is_the_exact_nll_of_its_full_distribution() -> None:
    torch.manual_seed(0)
    head = heads.AdaptiveHead(24, 1000, [100, 500])
    h = torch.randn(3, 7, 24)  # (B, T, H)
    targets = torch.randint(0, 1000, (3, 7))  # (B, T): rows in the head and in both clusters
    assert (targets < 100).any() and (targets >= 500).any()
    outputs = head(h)
    log_prob = heads.scores(outputs)  # (B, T, V)
    assert_close(log_prob.logsumexp(-1), torch.zeros(3, 7), "a distribution", 1e-5)
    exact = -log_prob.gather(-1, targets.unsqueeze(-1)).sum()
    assert_close(heads.nll(outputs, targets), exact, "adaptive NLL", 1e-4)


def test_an_adaptive_model_samples_from_its_full_distribution() -> None:
    """Greedy sampling (top_k=1) takes each step's most likely byte of log_prob."""
    model = lm_model(head="adaptive", cutoffs=[32, 128]).eval()
    text = BYTE_LM.generate(model, b"ab", 8, top_k=1)
    x = torch.tensor([list(b"ab")])  # (1, T)
    with torch.no_grad():
        for _ in range(8):
            outputs, _ = model(x)
            x = torch.cat([x, heads.scores(outputs)[:, -1:].argmax(-1)], 1)
    assert text == BYTES.decode(x[0].tolist())


def test_recall_reads_an_adaptive_heads_distribution() -> None:
    result = recall(lm_model(head="adaptive", cutoffs=[32, 128]), lag=3, count=8)
    assert 0 <= result["recall_accuracy"] <= 1 and result["recall_bits"] > 0


def test_a_source_of_token_ids_trains_without_text_samples(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """docs/heads.md's command: the Zipf source gives ids, not text; with the default
    trainer.sample_length the run leaves its text samples out and says so, naming the source,
    where it stopped at its first validation before."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    args = [*TINY, "data.source=random_tokens:zipf_1000", "trainer.sample_length=300"]
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        summary = run_in_process(tmp_path / "run", *args)  # 300: the default (tiny sets 20)
    assert summary["steps"] == 6 and math.isfinite(summary["val_loss"])
    said = "data.source=random_tokens:zipf_1000 holds token ids that no tokenizer of the run"
    assert said in caplog.text


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adaptive")
    with pytest.MonkeyPatch.context() as patch:  # the Zipf source, a user's module
        patch.syspath_prepend(str(PLUGINS))
        run_in_process(out, *ZIPF)
    return out


def test_an_adaptive_head_trains_on_1000_ids_and_evaluates_as_validated(
    adaptive_run, monkeypatch, capsys
) -> None:
    summary = json.loads((adaptive_run / "summary.json").read_text())
    # A model that learned nothing scores ln 1000 = 6.91 nats or worse; the law's entropy is 5.19.
    assert 5.1 < summary["val_loss"] < math.log(1000) - 1
    ckpt = read(adaptive_run / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["spec"]["input_size"] == 1000
    assert "model.head.tail.1.1.weight" in ckpt["state_dict"]  # the second cluster's output
    monkeypatch.syspath_prepend(str(PLUGINS))
    evaluate.main([f"ckpt={adaptive_run / 'checkpoints' / 'last.ckpt'}", "split=val"])
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(
        summary["val_loss"], rel=1e-9
    )


def test_cutoffs_are_checked_against_the_vocabulary_when_it_is_known() -> None:
    task = LanguageModelling(DataSpec("tokens", 1000, 1000))
    cfg = ModelConfig(hidden_size=32, head="adaptive", cutoffs=[100, 1000])
    with pytest.raises(ConfigError, match=r"^model.cutoffs=\[100, 1000\]: must be < the vocab"):
        build_model(cfg, task)
