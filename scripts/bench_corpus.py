"""Training on a memory-mapped token file of several GiB against one of a few MiB: max RSS and
time per update.

Both cases train the same model for the same number of updates with `python -m seqtrain
data.path=X.bin data.vocab_size=V ...`, each in its own process, with validation and test splits
of the same absolute size. The B training streams of the large file start L = N / B tokens
apart, so its windows are read from all over the file. Measured per process: the peak resident
size (ru_maxrss of the child, from wait4: it counts the file pages a memory map made resident,
RssFile, as well as anonymous memory) and the median time per update (from the per-update
perf/tokens_per_s the run logs). Repetitions are interleaved, small and large alternating who
goes first; the figure of each case is the median over its repetitions.

Targets: the large file's max RSS within +150 MiB of the small one's, its time per update
within 5%. The large file is made sparse (random chunks among holes, read back as zeros) in a
temporary folder and removed afterwards.

    python scripts/bench_corpus.py                         # 4 GiB, on a quiet machine
    python scripts/bench_corpus.py --gib 0.25 --steps 5 --reps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
# The child processes import this checkout's seqtrain, whatever is installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
RSS_TARGET_MIB = 150  # the large file may cost at most this much more resident memory
TIME_TARGET = 1.05  # and at most this factor of time per update


def make_corpus(path: Path, tokens: int, vocab: int, dense: bool, seed: int) -> None:
    """A uint16 .bin of `tokens` ids below `vocab`: dense random ids, or sparse (1 MiB of
    random ids every 64 MiB, holes between; quick to write, no disk used for the holes)."""
    rng = np.random.default_rng(seed)
    with path.open("wb") as f:
        if dense:
            rng.integers(0, vocab, tokens, dtype=np.uint16).tofile(f)
            return
        f.truncate(tokens * 2)
        chunk, every = MIB // 2, 32 * MIB  # in tokens
        for start in range(0, tokens, every):
            f.seek(start * 2)
            f.write(rng.integers(0, vocab, min(chunk, tokens - start), dtype=np.uint16).tobytes())


def train_case(path: Path, tokens: int, run_dir: Path, args: argparse.Namespace) -> dict:
    """One `python -m seqtrain` run on `path`: its max RSS (MiB) and median update (ms)."""
    held_out = args.eval_batch * (args.window + 1) * 4  # val and test: 4 windows each
    fraction = held_out / tokens
    split = f"[{1 - 2 * fraction!r},{fraction!r},{fraction!r}]"
    never = args.steps * 10  # no validation or checkpoint inside the timed updates
    command = [
        sys.executable,
        "-m",
        "seqtrain",
        "data.source=text",
        f"data.path={path}",
        "data.dtype=uint16",
        f"data.vocab_size={args.vocab}",
        f"data.split={split}",
        f"data.batch_size={args.batch}",
        f"data.eval_batch_size={args.eval_batch}",
        f"model.hidden_size={args.hidden}",
        f"tbptt.window={args.window}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={never}",
        f"trainer.checkpoint_every={never}",
        "trainer.log_every_n_steps=1",
        "trainer.sample_length=0",
        "trainer.progress_bar=false",
        "optim.schedule.warmup_steps=1",
        f"hydra.run.dir={run_dir}",
    ]
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the children's max
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-2000:]
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{tail}")
    speeds = scalars(run_dir, "perf/tokens_per_s")  # one per update
    seconds = [args.batch * args.window / s for s in speeds]
    return {"rss_mib": usage.ru_maxrss * 1024 / MIB, "update_ms": 1e3 * statistics.median(seconds)}


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [e.value for e in acc.Scalars(tag)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=4.0, help="size of the large .bin (GiB)")
    parser.add_argument("--small-mib", type=float, default=8.0, help="size of the small .bin")
    parser.add_argument("--steps", type=int, default=50, help="updates per run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per case")
    parser.add_argument("--vocab", type=int, default=1024, help="data.vocab_size")
    parser.add_argument("--hidden", type=int, default=256, help="model.hidden_size")
    parser.add_argument("--batch", type=int, default=32, help="data.batch_size (streams)")
    parser.add_argument("--eval-batch", type=int, default=32, help="data.eval_batch_size")
    parser.add_argument("--window", type=int, default=128, help="tbptt.window")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the files and runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_corpus.md")
    args = parser.parse_args()
    sizes = {"small": int(args.small_mib * MIB) // 2, "large": int(args.gib * (1 << 30)) // 2}
    results: dict[str, list[dict]] = {"small": [], "large": []}
    with tempfile.TemporaryDirectory(prefix="bench_corpus.", dir=args.tmp) as tmp:
        files = {name: Path(tmp) / f"{name}.bin" for name in sizes}
        for name, path in files.items():
            make_corpus(path, sizes[name], args.vocab, dense=name == "small", seed=len(name))
        for rep in range(args.reps):
            order = ["small", "large"] if rep % 2 == 0 else ["large", "small"]
            for name in order:
                run_dir = Path(tmp) / f"{name}-{rep}"
                results[name].append(train_case(files[name], sizes[name], run_dir, args))
                got = results[name][-1]
                print(
                    f"[{rep + 1}/{args.reps}] {name}: max RSS {got['rss_mib']:.0f} MiB, "
                    f"{got['update_ms']:.1f} ms/update",
                    flush=True,
                )
    rss = {k: statistics.median(r["rss_mib"] for r in v) for k, v in results.items()}
    ms = {k: statistics.median(r["update_ms"] for r in v) for k, v in results.items()}
    rss_ok = rss["large"] - rss["small"] <= RSS_TARGET_MIB
    time_ok = ms["large"] <= TIME_TARGET * ms["small"]
    verdict = {True: "PASS", False: "FAIL"}
    defaults = parser.parse_args([])
    smoke = any(getattr(args, k) != getattr(defaults, k) for k in ("gib", "steps", "reps"))
    command = " ".join(["python scripts/bench_corpus.py", *sys.argv[1:]])
    lines = [
        "# Training on a corpus larger than memory",
        "",
        *(
            [
                "**A smoke run** (not the full benchmark: its figures are not for quoting). "
                "The full run: `python scripts/bench_corpus.py` on a quiet machine.",
                "",
            ]
            if smoke
            else []
        ),
        f"`{command}`: uint16 .bin files of {args.small_mib:g} MiB (dense) and {args.gib:g} GiB "
        f"(sparse), LSTM 1 x {args.hidden}, vocabulary {args.vocab}, {args.batch} streams, "
        f"window {args.window}, {args.steps} updates per run, {args.reps} interleaved "
        "repetitions, each run its own `python -m seqtrain` process. Max RSS: the process's peak "
        "resident size (ru_maxrss from wait4, file pages of memory maps included); time per "
        "update: the median over the run's updates (its perf/tokens_per_s); each figure the "
        "median over the repetitions. How the windows are read: docs/corpora.md.",
        "",
        "| case | file | max RSS (MiB) | time per update (ms) | runs (RSS MiB / ms) |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {sizes[name] * 2 / MIB:,.0f} MiB | {rss[name]:.0f} | {ms[name]:.1f} | "
            + ", ".join(f"{r['rss_mib']:.0f} / {r['update_ms']:.1f}" for r in results[name])
            + " |"
            for name in ("small", "large")
        ),
        "",
        f"- max RSS: large - small = {rss['large'] - rss['small']:+.0f} MiB "
        f"(target: at most +{RSS_TARGET_MIB} MiB): **{verdict[rss_ok]}**",
        f"- time per update: large / small = {ms['large'] / ms['small']:.3f} "
        f"(target: at most {TIME_TARGET:.2f}): **{verdict[time_ok]}**",
    ]
    partial = args.out.with_suffix(".md.part")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(args.out)  # atomic: an interrupted write leaves the previous table
    print("\n".join(lines[-2:]).replace("**", ""))
    print(f"wrote {args.out}")
    if not (rss_ok and time_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
