"""seqtrain.report on hand-written sweep directories: table, CSV, plots, missing figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from matplotlib.text import Text

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


def nearly_equal_sweep(root: Path, jobs: int = 6) -> Path:
    """Jobs whose figures differ in the fourth decimal (bpc) and by under 1% (tokens/s), with two
    more swept keys for long point labels, and one job that lacks the colour key."""
    for n in range(jobs):
        overrides = [f"tbptt.window={64 + 64 * (n % 2)}", f"optim.lr=0.00{n + 1}"]
        if n:  # job 0 has no model.backend: its colour is `-`, as its label says
            overrides.append(f"model.backend={'cudnn' if n % 3 else 'modular'}")
        bpc, speed = 1.8591 + 0.00004 * n, 44_100 + 40 * n
        make_job(root, str(n), overrides, summary(bpc, speed, (3 << 20) + n * 1000))
    return root


def drawn(fig):
    """The figure drawn as it is saved, and its renderer."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def speed_figure(root: Path):
    return report.figure(report.build([root]), "tokens_per_s", "tokens/s", 1.0, True)


def test_nearly_equal_figures_get_plain_ticks_that_tell_them_apart(tmp_path: Path) -> None:
    fig = speed_figure(nearly_equal_sweep(tmp_path / "sweep"))
    drawn(fig)
    (ax,) = fig.axes
    for axis in (ax.xaxis, ax.yaxis):
        assert axis.get_offset_text().get_text() == ""  # no `+1.859` or `1e4` beside the axis
        low, high = axis.get_view_interval()
        ticks = [t for t in axis.get_major_ticks() if low <= t.get_loc() <= high]
        texts = [t.label1.get_text() for t in ticks]
        assert len(set(texts)) == len(texts) > 2, texts  # each tick its own label
        for tick, text in zip(ticks, texts, strict=True):  # the number itself, written out
            assert float(text.replace(",", "")) == pytest.approx(tick.get_loc(), abs=1e-9), text
    assert any("," in t.get_text() for t in ax.get_xticklabels())  # 44,100: thousands marked
    assert report.tick_decimals([0.0, 0.25, 0.5]) == 2
    assert report.tick_decimals([44_100.0, 44_150.0]) == 0


def test_labels_neither_overlap_nor_leave_the_figure(tmp_path: Path) -> None:
    root = nearly_equal_sweep(tmp_path / "sweep", jobs=8)
    # one job far off: the eight nearly equal ones share a few pixels, their labels would too
    far = ["tbptt.window=256", "optim.lr=0.01", "model.backend=modular"]
    make_job(root, "far", far, summary(2.2, 20_000))
    fig = speed_figure(root)
    renderer = drawn(fig)
    (ax,) = fig.axes
    labels = [t for t in ax.texts if t.get_text()]
    assert len(labels) == 9 and all("\n" in t.get_text() for t in labels)  # one value a line
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # without the line to the point
    for axis in (ax.xaxis, ax.yaxis):
        ticks = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
        boxes_of_ticks = [t.get_window_extent(renderer) for t in ticks]
        assert not any(
            a.overlaps(b) for i, a in enumerate(boxes_of_ticks) for b in boxes_of_ticks[i + 1 :]
        )
        boxes += boxes_of_ticks
    assert not any(a.overlaps(b) for i, a in enumerate(boxes[:9]) for b in boxes[i + 1 :])
    page = fig.bbox
    texts = [*labels, ax.xaxis.label, ax.yaxis.label, *ax.get_legend().get_texts()]
    for text in texts:  # nothing cut at the figure's edge
        box = text.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, text.get_text()
        assert box.y1 <= page.y1, text.get_text()


def test_the_legend_lists_what_is_drawn(tmp_path: Path) -> None:
    fig = speed_figure(nearly_equal_sweep(tmp_path / "sweep"))
    drawn(fig)
    (ax,) = fig.axes
    series = [c.get_label() for c in ax.collections if len(c.get_offsets())]
    series += [line.get_label() for line in ax.lines if len(line.get_xdata()) > 1]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted(series)
    assert "backend=-" in legend  # the job without the key is drawn, and named as it is

    lone = tmp_path / "one_front_point"  # one job is best on both: no front line to name
    make_job(lone, "0", ["tbptt.window=16"], summary(2.4, 900))
    make_job(lone, "1", ["tbptt.window=32"], summary(2.5, 800))
    fig = speed_figure(lone)
    drawn(fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["window=16", "window=32"] and not fig.axes[0].lines


def test_the_report_says_how_noisy_tokens_per_s_is_and_gives_repeats_a_range(
    tmp_path: Path,
) -> None:
    root = tmp_path / "sweep"
    for n, (seed, speed) in enumerate([(1, 44_100), (2, 45_000), (3, 44_300)]):
        make_job(root, str(n), ["tbptt.window=64", f"seed={seed}"], summary(1.86, speed))
    make_job(root, "3", ["tbptt.window=128", "seed=1"], summary(1.85, 40_000))
    assert report.main([str(root)]) == 0
    text = (root / "report.md").read_text()
    assert "tokens/s is one measurement per job" in text and "4.5% of their median" in text
    assert "| `tbptt.window=64` | 3 | 44,300 | 44,100–45,000 | 2.0% |" in text
    assert "tbptt.window=128` |" not in text  # ran once: no range to give
