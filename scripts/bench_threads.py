"""Tokens/s of the README's main run with trainer.threads=auto, quiet and beside other work.

Three conditions: (a) quiet, (b) beside one busy-loop process (one core taken, as a browser or
a compiler takes it), (c) beside a second seqtrain run of its own. Each case is `python -m
seqtrain +experiment=char_lm` cut to a fixed number of updates (no validation, samples or
checkpoints inside them) in its own process; its figure is summary.json's tokens_per_s. The
cases of one repetition run in a rotated order, and each case's figure is the median over the
repetitions.

Compared against, in the same conditions:
  spin     trainer.threads=<all CPUs>: torch's default, one thread per CPU whatever the load,
           GNU OpenMP's default wait (its workers spin a while before they sleep)
  1        trainer.threads=1
  passive  trainer.threads=<all CPUs> with OMP_WAIT_POLICY=PASSIVE (workers sleep at once)

Targets (issue #25): (a) auto quiet within 3% of spin quiet; (b) auto beside the busy loop at
least 0.9x the better of 1 and passive beside it; (c) the two side-by-side runs' summed
tokens/s at least 0.9x one quiet auto run.

    python scripts/bench_threads.py              # on a quiet machine: ~25 minutes on 2 cores
    python scripts/bench_threads.py --smoke      # checks it runs (~1 min quiet, 4 busy); no figures
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from seqtrain.threads import usable_cpus  # noqa: E402  (no torch import: cheap)

# The child processes import this checkout's seqtrain, whatever is installed, and choose their
# own threads: the caller's OpenMP settings are left out.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))},
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    "PYTHONWARNINGS": "ignore",
}
QUIET_TARGET = 0.97  # (a) auto quiet / spin quiet
BUSY_TARGET = 0.9  # (b) auto busy / best of (1, passive) busy
SHARED_TARGET = 0.9  # (c) the pair's sum / one quiet auto run


def variants(cpus: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (overrides, environment additions) of each thread setting compared."""
    return {
        "auto": (["trainer.threads=auto"], {}),
        "spin": ([f"trainer.threads={cpus}"], {}),
        "1": (["trainer.threads=1"], {}),
        "passive": ([f"trainer.threads={cpus}"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    }


def command(run_dir: Path, args: argparse.Namespace, overrides: list[str]) -> list[str]:
    never = args.steps * 10  # no validation, sample or checkpoint inside the timed updates
    size = ["+debug=tiny"] if args.smoke else ["+experiment=char_lm"]
    return [
        sys.executable,
        "-m",
        "seqtrain",
        *size,
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={never}",
        f"trainer.checkpoint_every={never}",
        "trainer.sample_length=0",
        "trainer.progress_bar=false",
        "logger=csv",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def start(run_dir: Path, args: argparse.Namespace, variant: tuple) -> subprocess.Popen:
    overrides, extra = variant
    return subprocess.Popen(
        command(run_dir, args, overrides),
        env={**ENV, **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def tokens_per_s(proc: subprocess.Popen, run_dir: Path) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench_threads: a run failed ({run_dir}):\n{err[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())["tokens_per_s"]


@contextmanager
def busy_loop() -> Iterator[None]:
    """One process that keeps one core busy for as long as the case runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # scheduled and spinning before the case starts
        yield
    finally:
        proc.kill()
        proc.wait()


def run_case(case: str, scratch: Path, args: argparse.Namespace, cpus: int) -> list[float]:
    """One repetition of a case: "<condition>/<variant>"; the pair gives two figures."""
    condition, name = case.split("/")
    variant = variants(cpus)[name]
    dirs = [Path(tempfile.mkdtemp(dir=scratch)) / "run" for _ in range(2)]
    if condition == "quiet":
        return [tokens_per_s(start(dirs[0], args, variant), dirs[0])]
    if condition == "busy":
        with busy_loop():
            return [tokens_per_s(start(dirs[0], args, variant), dirs[0])]
    procs = [start(d, args, variant) for d in dirs]  # condition "pair": two runs side by side
    return [tokens_per_s(p, d) for p, d in zip(procs, dirs, strict=True)]


CASES = ("quiet/auto", "quiet/spin", "busy/auto", "busy/1", "busy/passive", "pair/auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="updates per run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every case")
    parser.add_argument("--smoke", action="store_true", help="tiny runs, once: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.reps = 5, 1
    cpus = usable_cpus()
    figures: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as scratch:
        for rep in range(args.reps):
            order = CASES[rep % len(CASES) :] + CASES[: rep % len(CASES)]  # interleaved
            for case in order:
                figures[case].append(sum(run_case(case, Path(scratch), args, cpus)))
                print(f"rep {rep + 1}/{args.reps}  {case:14s} {figures[case][-1]:>10,.0f} tokens/s")
    m = {case: statistics.median(values) for case, values in figures.items()}
    checks = [
        ("(a) quiet: auto / spin", m["quiet/auto"] / m["quiet/spin"], QUIET_TARGET),
        (
            "(b) busy loop: auto / best of 1, passive",
            m["busy/auto"] / max(m["busy/1"], m["busy/passive"]),
            BUSY_TARGET,
        ),
        ("(c) two runs: sum / one quiet", m["pair/auto"] / m["quiet/auto"], SHARED_TARGET),
    ]
    print(f"\n{cpus} CPUs, {args.steps} updates per run, median of {args.reps}")
    print("| case | tokens/s |\n| --- | ---: |")
    for case in CASES:
        print(f"| {case} | {m[case]:,.0f} |")
    failed = 0
    for name, ratio, target in checks:
        verdict = "PASS" if ratio >= target else "FAIL"
        failed += verdict == "FAIL"
        print(f"{verdict}  {name} = {ratio:.3f} (target >= {target})")
    if args.smoke:
        print("a smoke run: tiny model, one repetition; its figures are not for quoting")
        return
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
