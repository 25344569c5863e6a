"""python -m seqtrain.report SWEEP_DIR: one table and two plots for a sweep.

Every job directory under SWEEP_DIR (any depth: Hydra's `multirun/DATE/TIME/N/`, an Optuna
study, a SLURM sweep) that holds `.hydra/` or `summary.json` is one row. The columns are the
overrides that differ between jobs, then the figures a user trades off: final val bpc, training
tokens/s and peak memory. Jobs without a summary (still running, stopped by a signal, failed)
are listed too, so a sweep's holes are visible.

Writes SWEEP_DIR/report.md, report.csv, report_speed.png (val bpc against tokens/s) and
report_memory.png (val bpc against peak memory; only when some summary has `peak_bytes`).
Points on the Pareto front (no other job is both faster / smaller and better) are starred.
The plots stay readable when the jobs' figures are nearly equal: plain tick labels with the
decimals that tell them apart (no offset such as `+1.859`), point labels moved apart until none
overlaps another. tokens/s is one measurement per job: the report says how much it varies, and
gives the range of each configuration a sweep repeated (jobs that differ only in `seed`).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib import ticker

from seqtrain import rundir

# Overrides that say how a job ran, not what it trained: never sweep columns.
NOT_SWEPT = ("hydra.", "resume", "ckpt_path")
# Overrides that repeat a configuration rather than change it: jobs that differ only in these
# are one configuration measured several times.
REPEAT_KEYS = ("seed",)
MIB = 2**20
# How much one run's tokens/s varies on a quiet machine: five runs of one model on 2 quiet CPU
# cores ranged 24,527-25,647 tokens/s, 4.5% of their median (docs/bench_tbptt.md).
QUIET_NOISE = "five runs of one model on 2 quiet CPU cores ranged over 4.5% of their median"


@dataclass
class Job:
    path: Path  # the job's directory
    overrides: dict[str, str]  # key -> value, as typed on the command line
    summary: dict | None  # summary.json, or None when the job has not finished
    problem: str | None = None  # why the job's files could not be read, or its error.txt

    @property
    def status(self) -> str:
        if self.problem is not None:
            return self.problem
        if self.summary is None:
            return "no summary"
        return str(self.summary.get("stopped_by") or "done")

    def figure(self, name: str) -> float | None:
        """A numeric summary figure, or None when absent or not finite."""
        if self.summary is None:
            return None
        value = self.summary.get(name)
        if name == "peak_bytes" and value is None:  # else the memory plan's measurement
            memory = self.summary.get("memory")
            if isinstance(memory, dict):
                value = memory.get("peak_bytes")
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        return None


@dataclass
class Report:
    jobs: list[Job]
    swept: list[str]  # override keys whose values differ between jobs
    common: dict[str, str] = field(default_factory=dict)  # overrides every job shares

    def label(self, job: Job) -> str:
        """Short point label: the swept values, keyed by their last name part."""
        parts = [f"{k.split('.')[-1]}={job.overrides.get(k, '-')}" for k in self.swept]
        return " ".join(parts) or job.path.name

    def repeats(self) -> list[list[Job]]:
        """Configurations the sweep ran more than once (jobs equal but for REPEAT_KEYS), each
        the list of its jobs that measured tokens/s."""
        groups: dict[tuple, list[Job]] = {}
        for job in self.jobs:
            if job.figure("tokens_per_s") is not None:
                key = tuple(sorted(kv for kv in job.overrides.items() if kv[0] not in REPEAT_KEYS))
                groups.setdefault(key, []).append(job)
        return [jobs for jobs in groups.values() if len(jobs) > 1]

    def rows(self) -> list[dict]:
        rows = []
        for job in self.jobs:
            s = job.summary or {}
            peak = job.figure("peak_bytes")
            rows.append(
                {
                    "job": str(job.path),
                    **{k: job.overrides.get(k, "") for k in self.swept},
                    "val_bpc": job.figure("val_bpc"),
                    "val_loss": job.figure("val_loss"),
                    "tokens_per_s": job.figure("tokens_per_s"),
                    "peak_bytes": None if peak is None else int(peak),
                    "steps": integer(s, "steps"),
                    "tokens": integer(s, "tokens"),
                    "train_seconds": job.figure("train_seconds"),
                    "backend": s.get("backend") if isinstance(s.get("backend"), str) else None,
                    "device": s.get("device") if isinstance(s.get("device"), str) else None,
                    "status": job.status,
                }
            )
        return rows


def integer(summary: dict, key: str) -> int | None:
    """A count from a summary; None when absent or not an integer (a bad row, not a crash)."""
    value = summary.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """['+experiment=char_lm', 'model.backend=modular'] -> {'experiment': 'char_lm', ...}."""
    out = {}
    for line in lines:
        key, eq, value = str(line).partition("=")
        key = key.lstrip("+~")
        if eq and not key.startswith(NOT_SWEPT):
            out[key] = value
    return out


def find_jobs(root: Path) -> list[Job]:
    """Job directories under root: those with .hydra/ or summary.json (Lightning DDP's children
    and submitit's logs are skipped)."""
    dirs = {p.parent for p in root.rglob("summary.json")}
    dirs |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    dirs |= {p.parent for p in root.rglob("error.txt")}
    jobs = []
    for d in sorted(dirs):
        if ".submitit" in d.parts:
            continue
        jobs.append(read_job(d))
    return jobs


def read_job(d: Path) -> Job:
    """One job's overrides and summary; a file that cannot be read makes the job a bad row
    (status `bad: ...`), never the end of the report; a job's error.txt makes it `failed: ...`."""
    overrides, summary, problem = {}, None, None
    overrides_file, summary_file, error_file = (
        d / ".hydra" / "overrides.yaml",
        d / "summary.json",
        d / "error.txt",
    )
    try:
        if overrides_file.is_file():
            lines = yaml.safe_load(overrides_file.read_text()) or []
            if not isinstance(lines, list):
                raise ValueError("not a list of overrides")
            overrides = parse_overrides(lines)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        problem = f"bad: .hydra/overrides.yaml ({str(err).splitlines()[0]})"
    try:
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            if not isinstance(summary, dict):
                summary, problem = None, "bad: summary.json is not a JSON object"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"bad: summary.json ({str(err).splitlines()[0]})"
    if error_file.is_file() and summary is None:
        try:
            problem = "failed: " + error_file.read_text(errors="replace").strip()
        except OSError:
            problem = "failed"
    return Job(d, overrides, summary, problem)


def build(roots: list[Path]) -> Report:
    jobs = [job for root in roots for job in find_jobs(root)]
    keys = sorted({k for job in jobs for k in job.overrides})
    swept = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in swept} if jobs else {}

    def order(job: Job) -> tuple:
        bpc = job.figure("val_bpc")
        return (bpc is None, bpc if bpc is not None else 0.0, str(job.path))

    return Report(sorted(jobs, key=order), swept, common)


def pareto(points: list[tuple[float, float]], more_is_better: bool) -> set[int]:
    """Indices of points (x, bpc) that no other point beats on both axes (bpc: lower is better;
    x: higher is better for tokens/s, lower for memory)."""
    front = set()
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x if more_is_better else ox <= x) and oy <= y and (ox != x or oy != y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.add(i)
    return front


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: Report, root: Path, plots: dict[str, Path | None]) -> str:
    done = [j for j in report.jobs if j.figure("val_bpc") is not None]
    timed = [j for j in done if j.figure("tokens_per_s") is not None]  # null: no update ran
    speed = [(j.figure("tokens_per_s"), j.figure("val_bpc")) for j in timed]
    starred = {timed[i].path for i in pareto(speed, more_is_better=True)}
    lines = [f"# Sweep report: {root}", ""]
    lines.append(f"{len(report.jobs)} jobs, {len(done)} with a final val bpc.")
    if report.common:
        shared = " ".join(f"{k}={v}" for k, v in report.common.items())
        lines.append(f"Shared overrides: `{shared}`.")
    lines += ["★ = on the Pareto front of val bpc against tokens/s.", ""]
    header = ["job", *report.swept, "val bpc", "tokens/s", "peak MiB", "steps", "status"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for job, row in zip(report.jobs, report.rows(), strict=True):
        name = job.path.relative_to(root) if job.path.is_relative_to(root) else job.path
        mark = " ★" if job.path in starred else ""
        peak = row["peak_bytes"]
        cells = [
            f"{name}{mark}",
            *(f"`{row[k]}`" if row[k] else "–" for k in report.swept),  # –: not set
            _fmt(row["val_bpc"], ".4f"),
            _fmt(row["tokens_per_s"], ",.0f"),
            _fmt(None if peak is None else peak / MIB, ",.1f"),
            _fmt(row["steps"], "d"),  # an int or None (a bad field is None)
            row["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *noise(report), ""]
    for title, path in plots.items():
        if path is None:
            lines.append(f"No {title} plot: no summary.json records `peak_bytes`.")
        else:
            lines.append(f"![{title}]({path.name})")
    return "\n".join(lines) + "\n"


def noise(report: Report) -> list[str]:
    """How far apart two jobs' tokens/s must be to mean something: a sentence, and the range of
    every configuration the sweep repeated."""
    lines = [
        "tokens/s is one measurement per job (training tokens over training seconds): "
        f"{QUIET_NOISE} (docs/bench_tbptt.md), and a shared machine moves it far more, so a "
        "smaller difference between two jobs is noise. Repeat a configuration "
        "(`seed=1,2,3`) to see its range here."
    ]
    groups = report.repeats()
    if groups:
        lines += ["", "| repeated configuration | jobs | tokens/s median | range | range/median |"]
        lines.append("|---|---|---|---|---|")
    for jobs in groups:
        speeds = sorted(j.figure("tokens_per_s") for j in jobs)
        middle = statistics.median(speeds)
        swept = [k for k in report.swept if k not in REPEAT_KEYS]
        config = " ".join(f"{k}={jobs[0].overrides.get(k, '-')}" for k in swept)
        lines.append(
            f"| `{config or '(all)'}` | {len(jobs)} | {middle:,.0f} "
            f"| {speeds[0]:,.0f}–{speeds[-1]:,.0f} | {(speeds[-1] - speeds[0]) / middle:.1%} |"
        )
    return lines


def write_csv(report: Report, path: Path) -> None:
    rows = report.rows()
    fields = list(rows[0]) if rows else ["job"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    rundir.write_atomic(path, text.getvalue())


def plot(report: Report, x_figure: str, xlabel: str, scale: float, more_is_better: bool, path):
    """The figure of `figure` as a PNG; returns the path, or None when no job has x_figure."""
    import matplotlib.pyplot as plt

    fig = figure(report, x_figure, xlabel, scale, more_is_better)
    if fig is None:
        return None
    with rundir.atomic_file(path) as out:
        fig.savefig(out, format="png")
    plt.close(fig)
    return path


def figure(report: Report, x_figure: str, xlabel: str, scale: float, more_is_better: bool):
    """Scatter of val bpc against one cost figure, coloured by the first swept key's value, with
    the Pareto front drawn and its layout fixed; None when no job has that figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [
        j for j in report.jobs if j.figure("val_bpc") is not None and j.figure(x_figure) is not None
    ]
    if not jobs:
        return None
    points = [(j.figure(x_figure) / scale, j.figure("val_bpc")) for j in jobs]
    colour_key = report.swept[0] if report.swept else None
    colour = {j.path: j.overrides.get(colour_key, "-") if colour_key else "" for j in jobs}
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120, layout="constrained")
    for n, value in enumerate(sorted(set(colour.values()))):
        idx = [i for i, j in enumerate(jobs) if colour[j.path] == value]
        ax.scatter(
            [points[i][0] for i in idx],
            [points[i][1] for i in idx],
            color=cmap(n % 10),
            label=f"{colour_key.split('.')[-1]}={value}" if colour_key else None,
            zorder=3,
        )
    front = sorted((points[i] for i in pareto(points, more_is_better)), key=lambda p: p[0])
    if len(front) > 1:  # one point is no line: the legend would name what is not drawn
        ax.plot(*zip(*front, strict=True), color="0.5", ls="--", zorder=2, label="Pareto front")
    # The colour says the first swept value; each point's label the others, one per line, on
    # the side of the point towards the middle (a label does not run off the plot).
    others = report.swept[1:]
    middle = (min(x for x, _ in points) + max(x for x, _ in points)) / 2
    labels = [
        ax.annotate(
            "\n".join(f"{k.split('.')[-1]}={job.overrides.get(k, '-')}" for k in others),
            (x, y),
            fontsize=7,
            xytext=(-4 if x > middle else 4, 4),
            textcoords="offset points",
            ha="right" if x > middle else "left",
            # a thin line from the label's near corner to its point, once labels are moved apart
            arrowprops={
                "arrowstyle": "-",
                "color": "0.6",
                "lw": 0.6,
                "shrinkA": 0,
                "shrinkB": 3,
                "relpos": (1, 0) if x > middle else (0, 0),
            },
        )
        for job, (x, y) in zip(jobs, points, strict=True)
        if others
    ]
    ax.margins(x=0.15, y=0.15)  # room for the labels
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(PlainNumbers())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val bpc (lower is better)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    for _ in range(3):  # the layout, the labels' places in it, the layout around the labels
        fig.canvas.draw()
        if not spread(labels, fig.canvas.get_renderer(), fig.dpi):
            break
    fig.set_layout_engine("none")  # kept as it is now: the labels' places fit it
    return fig


class PlainNumbers(ticker.Formatter):
    """Tick labels as plain numbers, thousands separated, with the decimals that tell the ticks
    apart: matplotlib's default would write 1.8591 and 1.8593 as 0.0001 and 0.0003 under a
    `+1.859` offset, and 44,100 as 4.41 under `1e4`."""

    decimals = 0

    def set_locs(self, locs) -> None:
        super().set_locs(locs)
        self.decimals = tick_decimals(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:,.{self.decimals}f}"


def tick_decimals(locs) -> int:
    """The fewest decimals that write every tick exactly: [0, 0.25, 0.5] -> 2, [44100, 44150] ->
    0, [1.8591, 1.85915] -> 5."""
    step = min((abs(b - a) for a, b in itertools.pairwise(locs)), default=0.0) or 1.0
    for decimals in range(12):
        if all(abs(round(x, decimals) - x) < step * 1e-3 for x in locs):
            return decimals
    return 12


def spread(labels: list, renderer, dpi: float) -> bool:
    """Move point labels up, a little at a time, until none overlaps another (points nearly
    equal in both figures would print their labels on top of each other); whether any moved."""
    from matplotlib.text import Text

    placed, moved = [], False
    for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
        box = Text.get_window_extent(label, renderer)  # the text, without its line to the point
        while any(box.overlaps(other) for other in placed):
            dx, dy = label.xyann
            label.xyann = (dx, dy + 3.0)  # points
            box, moved = box.translated(0, 3.0 * dpi / 72), True
        placed.append(box)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqtrain.report",
        description="Collect a sweep's summary.json files into report.md, report.csv and plots.",
    )
    parser.add_argument("sweep_dir", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, help="where to write (default: the first sweep_dir)")
    args = parser.parse_args(argv)
    for root in args.sweep_dir:
        if not root.is_dir():
            print(f"seqtrain.report: error: {root}: no such directory", file=sys.stderr)
            return 2
    report = build(args.sweep_dir)
    if not report.jobs:
        print(
            f"seqtrain.report: error: no job directories (summary.json or .hydra/) under "
            f"{' '.join(map(str, args.sweep_dir))}",
            file=sys.stderr,
        )
        return 2
    out = args.out or args.sweep_dir[0]
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "val bpc vs tokens/s": plot(
            report, "tokens_per_s", "training tokens/s", 1.0, True, out / "report_speed.png"
        ),
        "val bpc vs peak memory": plot(
            report, "peak_bytes", "peak memory (MiB)", MIB, False, out / "report_memory.png"
        ),
    }
    text = markdown(report, args.sweep_dir[0], plots)
    (out / "report.md").write_text(text)
    write_csv(report, out / "report.csv")
    print(text)
    written = ["report.md", "report.csv", *(p.name for p in plots.values() if p is not None)]
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
