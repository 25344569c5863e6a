"""Issue #24, the run side: every failure is one line and releases what it holds, summaries never
hold invented figures, and a refused run writes nothing into a folder it does not own."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from seqtrain import cli, train
from seqtrain.config import validate

from .test_config import composed

TINY = ["+debug=tiny", "trainer.sample_length=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run folder (checkpoints at step 6 and summary.json)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train.fit(train.prepare(validate(composed(*TINY)), run_dir))
    return run_dir


def copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    run_dir = tmp_path / name
    shutil.copytree(finished, run_dir)
    return run_dir


def main(monkeypatch, *args: str) -> int:
    """`python -m seqtrain TINY args` in this process; its exit status."""
    monkeypatch.setattr(sys, "argv", ["seqtrain", *TINY, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        cli.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


# Summaries never hold invented figures.


def test_resume_that_trains_nothing_writes_no_zero_throughput(
    finished, tmp_path, monkeypatch, capsys
) -> None:
    """A stop at the last step leaves last.ckpt at trainer.max_steps and no summary.json; its
    resume runs no update, so it measured no throughput and no memory: null with the reason."""
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "summary.json").unlink()
    assert main(monkeypatch, "resume=auto", f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in train.UPDATE_FIGURES:
        assert summary[key] is None, (key, summary[key])
    assert "no update ran" in summary["figures_note"]
    assert summary["steps"] == 6 and summary["val_bpc"] > 0  # the real figures stay
    out = capsys.readouterr().out
    assert "0 tokens/s" not in out and "no update ran" in out


def test_resume_that_trains_nothing_keeps_the_earlier_runs_figures(finished, tmp_path) -> None:
    """ckpt_path= of a finished run into a new folder: the figures of the run that wrote it."""
    source = copy_run(finished, tmp_path, "source")
    earlier = json.loads((source / "summary.json").read_text())
    cfg = validate(composed(*TINY, f"ckpt_path={source / 'checkpoints' / 'last.ckpt'}"))
    summary = train.fit(train.prepare(cfg, tmp_path / "new"))
    for key in train.UPDATE_FIGURES:
        assert summary[key] == earlier[key], key
    assert earlier["tokens_per_s"] > 0 and summary["figures_from"] == str(source / "summary.json")
