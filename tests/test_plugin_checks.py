"""Every plug-in is checked when it is built, before any work (issue #24, principle 3).

A user's cell runs a (2, 3, I) probe; a task shows its kind, a monitor among its figures and a
scalar loss on a probe; loggers and callbacks are Lightning's kinds; the optimizer and its schedule
are built on a dummy parameter. Each refusal is one line naming the key and the class, exit 2,
with nothing written. An error raised inside a plug-in's own code is one line naming the key
that named it, then the plug-in's own frame, exit 1. The plug-ins are tests/plugins/bad_plugins.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from seqtrain import cli, evaluate, sample

from .conftest import ROOT, refusal, run_in_process

TINY = ["+debug=tiny", "trainer.sample_length=0"]
SERIES = ["task=regression", "data.source=mackey_glass", "data.length=2000"]
BAD = "tests.plugins.bad_plugins"


class Row(NamedTuple):
    name: str  # its row in docs/errors.md
    args: list[str]
    message: str  # the tell-tale part of the one line, naming the key and the class
    before: str  # what happened without the check


ROWS = [
    Row(
        "cell plug-in of the wrong width",
        ["model.backend=modular", f"model.cell={BAD}:Wide"],
        f"model.cell={BAD}:Wide: Wide.forward gives h of shape (2, 32) for x of (2, 8); it must "
        "be (2, 16) (B, model.hidden_size)",
        "a shape error inside the head at the first update, a traceback",
    ),
    Row(
        "cell plug-in short of a state tensor",
        ["model.backend=modular", f"model.cell={BAD}:OneState"],
        f"model.cell={BAD}:OneState: OneState.forward returned a state of 1 tensor(s) but "
        "OneState.num_states is 2",
        "a traceback when the stack stacked the state",
    ),
    Row(
        "task plug-in without the protocol",
        [*SERIES, f"task.name={BAD}:Unfinished"],
        f"task.name={BAD}:Unfinished: Unfinished lacks input_layer, head, loss, metrics, "
        "random_batch of the task protocol (seqtrain.tasks.Task; docs/tasks.md)",
        "a traceback from Task's NotImplementedError when the model was built",
    ),
    Row(
        "task plug-in without a kind",
        [*SERIES, f"task.name={BAD}:NoKind"],
        f"task.name={BAD}:NoKind: NoKind.kind=None; it must say the data it reads: 'tokens' or "
        "'series'",
        "refused as a task of None data for a series corpus, a message that misleads",
    ),
    Row(
        "task plug-in whose monitor it never logs",
        [*SERIES, f"task.name={BAD}:UnloggedMonitor"],
        f"task.name={BAD}:UnloggedMonitor: UnloggedMonitor.monitor='mae' is not among the "
        "figures its metrics give (mse, nmse)",
        "trained, then best.ckpt and the summary failed on the missing val/mae",
    ),
    Row(
        "task plug-in whose loss is not a scalar",
        [*SERIES, f"task.name={BAD}:VectorLoss"],
        f"task.name={BAD}:VectorLoss: VectorLoss.loss gives (2, 3, 1) for a (2, 3) probe; it "
        "must be a scalar tensor (the sum over the target elements)",
        "a traceback at the first update, after the run had started",
    ),
    Row(
        "callback that is not a Callback",
        [f"+callbacks.x._target_={BAD}.NotACallback"],
        f"callbacks.x._target_={BAD}.NotACallback: is not a lightning.pytorch.Callback subclass",
        "Lightning's traceback once the Trainer was built",
    ),
    Row(
        "logger that is not a Logger",
        [f"+logger.x._target_={BAD}.NotALogger"],
        f"logger.x._target_={BAD}.NotALogger: is not a lightning.pytorch.loggers.Logger subclass",
        "a traceback once the Trainer was built",
    ),
    Row(
        "optimizer argument out of range",
        ["optim.optimizer.betas=[2,3]"],
        "optim.optimizer.betas=[2, 3]: torch.optim.AdamW: Invalid beta parameter at index 0: 2",
        "a traceback when the module built its optimizer, after the run had started",
    ),
    Row(
        "negative optimizer epsilon",
        ["+optim.optimizer.eps=-1"],
        "optim.optimizer.eps=-1: torch.optim.AdamW: Invalid epsilon value: -1",
        "a traceback when the module built its optimizer, after the run had started",
    ),
    Row(
        "schedule plug-in that builds no scheduler",
        [f"optim.schedule._target_={BAD}.no_schedule"],
        f"optim.schedule._target_={BAD}.no_schedule: built a NoneType, not a "
        "torch.optim.lr_scheduler.LRScheduler",
        "a traceback at the first update",
    ),
]


def run_cli(monkeypatch, run_dir: Path, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["seqtrain", *TINY, *args, f"hydra.run.dir={run_dir}"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cli.main()


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_bad_plugin_is_refused_when_built(row: Row, tmp_path, monkeypatch, capsys) -> None:
    """One line naming the key and the class, exit 2, nothing written (each row's `before` is
    what happened without the check)."""
    run_dir = tmp_path / "run"
    err = refusal(run_cli, monkeypatch, run_dir, *row.args, capsys=capsys)
    assert row.message in err, err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / ".hydra").exists()
    assert not (run_dir / ".seqtrain.lock").exists()


def test_docs_list_every_plugin_check() -> None:
    table = (ROOT / "docs" / "errors.md").read_text()
    for row in ROWS:
        assert f"| {row.name} |" in table, row.name
        assert row.message in table, row.message


def plugin_failure(monkeypatch, capsys, run_dir: Path, *args: str) -> list[str]:
    """The lines a run whose plug-in raises prints on stderr; it must exit 1."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(monkeypatch, run_dir, *args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    return err.strip().splitlines()


def test_an_error_inside_a_plugin_is_its_line_and_its_frame(tmp_path, monkeypatch, capsys):
    """A bug in a cell's own forward, met by the probe: the key that named it, the error, and the
    cell's own frame; no frame of seqtrain, torch or Lightning (it was a 60-line traceback)."""
    cell = ["model.backend=modular", f"model.cell={BAD}:Buggy"]
    lines = plugin_failure(monkeypatch, capsys, tmp_path / "run", *cell)
    assert lines[0] == (
        f"seqtrain: error: model.cell={BAD}:Buggy raised ZeroDivisionError: the cell's own bug"
    )
    assert len(lines) == 3 and "bad_plugins.py" in lines[1] and "in forward" in lines[1]
    assert lines[2].strip() == 'raise ZeroDivisionError("the cell\'s own bug")'


def test_a_plugin_error_during_training_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """A callback raising at step 5 of a single run: its line and frame (it was the whole
    traceback through Lightning), the lock released, the step-4 checkpoint kept for a resume."""
    run_dir = tmp_path / "run"
    boom = [
        "+callbacks.boom._target_=tests.plugins.boom.Boom",
        "+callbacks.boom.at_step=5",
        "trainer.checkpoint_every=2",
    ]
    lines = plugin_failure(monkeypatch, capsys, run_dir, *boom)
    assert lines[0] == (
        "seqtrain: error: callbacks.boom._target_=tests.plugins.boom.Boom raised ValueError: "
        "boom at step 5"
    )
    assert len(lines) == 3 and "boom.py" in lines[1] and "on_train_batch_end" in lines[1]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / ".seqtrain.lock").exists()


@pytest.mark.parametrize("tool", [evaluate.main, sample.main], ids=["evaluate", "sample"])
def test_the_tools_show_a_plugins_error_as_its_line_and_frame(
    tmp_path, monkeypatch, capsys, tool
) -> None:
    """evaluate and sample rebuild a user's cell from the checkpoint: its own error there is the
    key's line and its frame too (it was a traceback through torch and seqtrain)."""
    run_in_process(tmp_path, *TINY, "model.backend=modular", f"model.cell={BAD}:Flaky")
    monkeypatch.setenv("FLAKY_CELL", "1")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        tool([f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1, lines
    assert lines[0] == f"seqtrain: error: model.cell={BAD}:Flaky raised RuntimeError: flaky"
    assert len(lines) == 3 and "bad_plugins.py" in lines[1] and "in forward" in lines[1]
