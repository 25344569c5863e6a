"""seqtrain.report on hand-written sweep directories: table, CSV, plots, missing figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from seqtrain import report


def make_job(root: Path, name: str, overrides: list[str], summary: dict | None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    return job


def summary(bpc: float, tokens_per_s: float, peak: int | None = None) -> dict:
    s = {"steps": 6, "tokens": 384, "val_bpc": bpc, "val_loss": bpc * 0.693}
    s |= {"tokens_per_s": tokens_per_s, "train_seconds": 1.5, "backend": "cudnn", "device": "cpu"}
    return s if peak is None else {**s, "peak_bytes": peak}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    common = ["+experiment=char_lm", "hydra.sweep.dir=x"]
    make_job(
        root, "0", [*common, "model.backend=cudnn", "memory.chunk=16"], summary(2.5, 900, 3 << 20)
    )
    make_job(
        root, "1", [*common, "model.backend=cudnn", "memory.chunk=64"], summary(2.4, 800, 5 << 20)
    )
    make_job(root, "2", [*common, "model.backend=modular", "memory.chunk=16"], summary(2.6, 300))
    make_job(root, "3", [*common, "model.backend=modular", "memory.chunk=64"], None)  # unfinished
    return root


def test_table_has_swept_columns_sorted_by_bpc_and_lists_unfinished_jobs(sweep: Path) -> None:
    assert report.main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    assert "Shared overrides: `experiment=char_lm`" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].split(" | ")[1:3] == ["memory.chunk", "model.backend"]
    jobs = [line.split(" | ")[0].strip("| ★") for line in lines[1:]]
    assert jobs == ["1", "0", "2", "3"]  # by val bpc, the unfinished job last
    assert "| 3 | `64` | `modular` | – | – | – | – | no summary |" in text
    assert "| 0 ★ |" in text and "| 1 ★ |" in text and "| 2 |" in text  # 2 is slower and worse
    assert "3.0 |" in text  # peak memory in MiB


def test_csv_holds_every_job_with_raw_figures(sweep: Path) -> None:
    report.main([str(sweep)])
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    first = rows[0]
    assert first["memory.chunk"] == "64" and first["model.backend"] == "cudnn"
    assert float(first["val_bpc"]) == 2.4 and int(first["peak_bytes"]) == 5 << 20
    assert rows[2]["peak_bytes"] == "" and rows[3]["status"] == "no summary"


def test_plots_are_pngs_and_memory_plot_needs_peak_bytes(sweep: Path, tmp_path: Path) -> None:
    report.main([str(sweep)])
    for name in ("report_speed.png", "report_memory.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    bare = tmp_path / "no_memory"
    make_job(bare, "0", ["tbptt.window=16"], summary(2.5, 900))
    make_job(bare, "1", ["tbptt.window=32"], summary(2.4, 700))
    assert report.main([str(bare)]) == 0
    assert (bare / "report_speed.png").is_file()
    assert not (bare / "report_memory.png").exists()
    assert (
        "No val bpc vs peak memory plot: no summary.json records `peak_bytes`"
        in (bare / "report.md").read_text()
    )


def test_pareto_front() -> None:
    points = [(900.0, 2.5), (800.0, 2.4), (300.0, 2.6), (900.0, 2.45)]
    assert report.pareto(points, more_is_better=True) == {1, 3}
    assert report.pareto([(3.0, 2.5), (5.0, 2.4), (6.0, 2.6)], more_is_better=False) == {0, 1}


def test_empty_or_missing_directory_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("no such directory") and "no job directories" in err[1]
