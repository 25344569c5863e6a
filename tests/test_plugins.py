"""Extending seqtrain from outside the package, through the command line as a user does it."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import PLUGINS, seqtrain, with_pythonpath

TINY = ["+debug=tiny", "trainer.sample_length=0"]


def test_a_user_corpus_source_trains_by_import_path(tmp_path: Path) -> None:
    """Through the command line as a user runs it: the module found on PYTHONPATH."""
    run = tmp_path / "run"
    done = seqtrain(
        *TINY,
        "data.source=my_sources:alphabet",
        f"hydra.run.dir={run}",
        env=with_pythonpath(PLUGINS),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 16
    assert "corpus alphabet" in (run / "cli.log").read_text()  # the user's source was read


def test_a_missing_plugin_module_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = seqtrain(*TINY, "data.source=no_such_module:load", f"hydra.run.dir={run}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "seqtrain: error: data.source=no_such_module:load: cannot import module 'no_such_module' "
        "(No module named 'no_such_module'); is it on PYTHONPATH?"
    ]
    assert not (run / ".hydra").exists() and not (run / "checkpoints").exists()
