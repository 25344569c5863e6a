"""Extension points: a user's cell named by import path trains, checkpoints, evaluates and samples
through the real command line with no edit of seqtrain; a built-in cell is one CellSpec plus its
registration; the registrations alone decide what each backend refuses."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from seqtrain import evaluate, sample
from seqtrain.cells import BACKENDS, base, build_recurrent, check_options, kernel_name, reference
from seqtrain.cells.stack import CellSpec, register_cell
from seqtrain.errors import ConfigError

from .conftest import (
    PLUGINS,
    ROOT,
    assert_exact_resume_in_process,
    run_in_process,
    seqtrain,
    with_pythonpath,
)

TINY = "my_cells:TinyCell"


@pytest.fixture
def plugins_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))


@pytest.fixture(scope="module")
def user_cell_run(tmp_path_factory) -> tuple[Path, dict]:
    """A user's two-layer cell (module on the path, named in the config), trained with dropout
    and zoneout: its checkpoint and summary."""
    out = tmp_path_factory.mktemp("user_cell")
    train = ["+debug=tiny", "model.backend=modular", f"model.cell={TINY}", "model.num_layers=2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PLUGINS))
        summary = run_in_process(out, *train, "model.dropout=0.1", "model.zoneout=0.1")
    return out / "checkpoints" / "last.ckpt", summary


def test_user_cell_trains_evaluates_and_samples(
    user_cell_run, plugins_on_path: None, capsys
) -> None:
    """The checkpoint records model.cell, so evaluate and sample rebuild the user's cell; without
    the module (a process whose PYTHONPATH lacks it), one line."""
    ckpt, summary = user_cell_run
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert "model.rnn.cells_l1.hh.weight" in state
    evaluate.main([f"ckpt={ckpt}", "split=val"])
    assert json.loads(capsys.readouterr().out)["bpc"] == pytest.approx(summary["val_bpc"])
    sample.main([f"ckpt={ckpt}", "length=20", "prompt=ab"])
    text = capsys.readouterr().out
    assert text.startswith("ab") and len(text.encode()) >= 20
    missing = seqtrain(f"ckpt={ckpt}", module="seqtrain.evaluate", env=with_pythonpath(ROOT))
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1, missing.stderr
    assert f"model.cell={TINY}: cannot import module 'my_cells'" in lines[0]
    assert "PYTHONPATH" in lines[0]


@pytest.mark.slow
def test_compile_evaluates_a_user_cells_checkpoint(
    user_cell_run, plugins_on_path: None, capsys
) -> None:
    """model.backend=compile runs the user's step compiled on the same checkpoint."""
    ckpt, summary = user_cell_run
    evaluate.main([f"ckpt={ckpt}", "split=val", "model.backend=compile"])
    assert json.loads(capsys.readouterr().out)["bpc"] == pytest.approx(summary["val_bpc"], abs=1e-5)


def test_user_cell_resumes_exactly_after_a_stop(tmp_path: Path, plugins_on_path: None) -> None:
    """Stopped by SIGTERM mid-run and resumed: the user's stack is rebuilt from the import path
    and every step's loss equals the uninterrupted run's (zoneout: the RNG must match too)."""
    args = ["+debug=tiny", "trainer.max_steps=40", "trainer.val_check_interval=20"]
    args += ["trainer.sample_length=0", "model.backend=modular", f"model.cell={TINY}"]
    runs = assert_exact_resume_in_process(tmp_path, [*args, "model.zoneout=0.1"])
    assert runs["resumed"]["val_bpc"] == runs["reference"]["val_bpc"]


@pytest.mark.parametrize(
    ("backend", "cell", "n"),
    [
        ("modular", TINY, 1),
        ("modular", "my_cells:TwoStateCell", 2),
        pytest.param("compile", "my_cells:TwoStateCell", 2, marks=pytest.mark.slow),
    ],
)
def test_user_cell_runs_per_step_options_and_copies(
    backend: str, cell: str, n: int, plugins_on_path
) -> None:
    torch.manual_seed(0)
    options = dict(dropout=0.2, variational=True, recurrent_dropout=0.2, zoneout=0.2)
    rnn = build_recurrent(backend, cell, 5, 6, 2, **options)
    assert rnn.num_states == n and rnn.state_shapes(3) == [(2, 3, 6)] * n
    names = [name for name, _ in rnn.named_parameters()]
    assert names[0].startswith("cells_l0.") and names[-1].startswith("cells_l1.")
    x = torch.randn(3, 4, 5)
    y, state = rnn.train()(x)
    y.sum().backward()
    assert all(p.grad is not None for p in rnn.parameters())
    rnn.eval()
    for clone in (copy.deepcopy(rnn), pickle.loads(pickle.dumps(rnn))):
        assert torch.equal(clone(x)[0], rnn(x)[0])
    assert rnn.activation_elements_per_step(4) == 4 * rnn.activation_elements_per_step(1) > 0
    assert kernel_name(rnn, torch.device("cpu")).endswith(f"cell {cell}")


def test_user_cell_zoneout_and_recurrent_dropout_act_on_the_state(plugins_on_path) -> None:
    """Eval zoneout is the expectation p * h_prev + (1 - p) * h_new of the cell's own step."""
    torch.manual_seed(0)
    plain = build_recurrent("modular", TINY, 5, 6, 1).eval()
    zoned = build_recurrent("modular", TINY, 5, 6, 1, zoneout=0.25).eval()
    zoned.load_state_dict(plain.state_dict())
    x, h0 = torch.randn(3, 1, 5), torch.randn(1, 3, 6)
    (h_new,) = plain(x, (h0,))[1]
    (h_z,) = zoned(x, (h0,))[1]
    torch.testing.assert_close(h_z, 0.25 * h0 + 0.75 * h_new)
    dropped = build_recurrent("modular", TINY, 5, 6, 1, recurrent_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    assert torch.equal(dropped.eval()(x, (h0,))[0], plain(x, (h0,))[0])
    assert not torch.equal(dropped.train()(x, (h0,))[0], plain(x, (h0,))[0])


@pytest.mark.parametrize(
    ("backend", "cell", "options", "message"),
    [
        ("cudnn", TINY, {}, "does not run model.cell=my_cells:TinyCell; backends that run it: "
                            "modular, compile"),
        ("jit", TINY, {}, "backends that run it: modular, compile"),
        ("modular", TINY, {"layernorm": True}, "model.layernorm=true is not supported by a custom"),
        ("modular", TINY, {"weight_drop": 0.3}, "not supported by a custom cell"),
        ("compile", TINY, {"peephole": True}, "not supported by a custom cell"),
        ("modular", TINY, {"proj_size": 2}, "not supported by a custom cell"),
        ("modular", "my_cells:Nope", {}, "model.cell=my_cells:Nope: module 'my_cells' has no"),
        ("modular", "no_such_module:Cell", {}, "cannot import module 'no_such_module'"),
    ],
)  # fmt: skip
def test_user_cell_refusals_are_one_line(
    backend: str, cell: str, options: dict, message: str, plugins_on_path
) -> None:
    with pytest.raises(ValueError, match=None) as err:
        check_options(backend, cell, 2, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_user_cell_that_breaks_the_protocol_is_one_line(plugins_on_path) -> None:
    with pytest.raises(ConfigError, match="needs num_states = 1 .h. or 2"):
        build_recurrent("modular", "my_cells:NoStates", 5, 6, 1)


def elman_cell(xp, state, w: reference.LayerWeights, opt: reference.StepOptions):
    """nn.RNN's tanh step, as a new built-in cell's file would define it."""
    (h,) = state
    hp = reference.recurrent_input(h, opt).matmul(w.w_hh.t())
    return (reference.zoneout(h, torch.tanh(xp + hp), opt),)


def test_a_built_in_cell_is_one_spec_and_its_registration(monkeypatch) -> None:
    """What docs/cells.md tells a maintainer to write: a step and a CellSpec, registered. It
    matches nn.RNN, and the option errors follow from the registration."""
    monkeypatch.setattr(base.TABLE, "_table", dict(base.TABLE._table))  # undone after the test
    spec = CellSpec("elman", 1, 1, elman_cell, bias_in_step=False)
    register_cell(spec, ["modular", "compile"], ["dropout", "zoneout", "weight_drop"])
    torch.manual_seed(0)
    ref = nn.RNN(5, 6, 2, batch_first=True)
    x, h0 = torch.randn(3, 4, 5), torch.randn(2, 3, 6)
    for backend in ("modular", "compile"):
        rnn = build_recurrent(backend, "elman", 5, 6, 2)
        rnn.load_state_dict(ref.state_dict())
        torch.testing.assert_close(rnn(x, (h0,))[0], ref(x, h0)[0])
    with pytest.raises(ValueError, match="backends that run it: modular, compile"):
        check_options("cudnn", "elman", 2)
    with pytest.raises(
        ValueError, match="not supported by cell 'elman'; cells that support it: lstm$"
    ):
        check_options("modular", "elman", 2, peephole=True)
    assert base.backends() == BACKENDS
