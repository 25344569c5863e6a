"""What each tokenizer buys: a byte, a BPE and the word model on the same text at equal wall time,
in bits per byte of that text (and perplexity for the word model).

Every case is `+experiment=word_lm` (AWD-LSTM, 2 x 400, tied head, Python's documentation topics
split 0.8/0.1/0.1) with its tokenizer swapped:

    word   the experiment as it is: words with <unk> below count 2, NT-ASGD at lr 30, window 70
    bpe    data.tokenizer=bpe data.vocab_size=2048, the rest as for words
    bytes  data.tokenizer=bytes with awd-lstm-lm's character settings: Adam at 2e-3, window 150,
           dropout 0.25 between and after the layers, 0.1 on the input, none on embeddings

First each case trains a few updates, interleaved over repetitions, for its time per update (the
mean tokens per update over the median tokens/s of its updates; validation off). The word model
trains the experiment's updates; every other case gets as many updates as fit in that same time,
and as many validations. Then each case trains in full (its own `python -m seqtrain` process) and
`python -m seqtrain.evaluate` reads the best checkpoint's test split. Writes a markdown table.

    python scripts/bench_tokenizers.py                       # ~35 min on 2 quiet cores
    python scripts/bench_tokenizers.py --scale 0.02 --timing-steps 5 --reps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_corpus import ENV, scalars  # the child's path and a run's TensorBoard points
from omegaconf import OmegaConf

from seqtrain.checkpoint import read, spec_of

ROOT = Path(__file__).resolve().parents[1]
WORD = OmegaConf.load(ROOT / "conf" / "experiment" / "word_lm.yaml").trainer
WORD_STEPS, WORD_VALIDATIONS = WORD.max_steps, WORD.max_steps // WORD.val_check_interval
CASES = {
    "bytes": ["data.tokenizer=bytes", "data.min_count=1", "optim=adamw", "optim.lr=2e-3",
              "tbptt.window=150", "model.dropout=0.25", "model.input_dropout=0.1",
              "model.embedding_dropout=0"],
    "bpe": ["data.tokenizer=bpe", "data.vocab_size=2048", "data.min_count=1"],
    "word": [],
}  # fmt: skip


def train(name: str, overrides: list[str], run_dir: Path) -> dict:
    """One `python -m seqtrain +experiment=word_lm` run of a case; its summary.json."""
    command = [
        sys.executable,
        "-m",
        "seqtrain",
        "+experiment=word_lm",
        *CASES[name],
        *overrides,
        "trainer.progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    run(command, run_dir.with_suffix(".log"))
    return json.loads((run_dir / "summary.json").read_text())


def run(command: list[str], log_path: Path) -> str:
    """Run a seqtrain command with this checkout first on the path; its stdout."""
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def seconds_per_update(name: str, steps: int, run_dir: Path) -> float:
    """A short run without validation: mean tokens per update / median tokens/s."""
    never = steps * 10
    summary = train(
        name,
        [
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={never}",
            f"trainer.checkpoint_every={never}",
            "trainer.log_every_n_steps=1",
            "trainer.sample_length=0",
        ],
        run_dir,
    )
    speeds = scalars(run_dir, "perf/tokens_per_s")  # one per update
    return summary["tokens"] / summary["steps"] / statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timing-steps", type=int, default=40, help="updates per timing run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timing repetitions")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the word updates")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_tokenizers.md")
    args = parser.parse_args()
    names = list(CASES)
    timings: dict[str, list[float]] = {name: [] for name in names}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_tokenizers.", dir=args.tmp) as tmp:
        for rep in range(args.reps):
            first = rep % len(names)  # each case goes first in turn
            for name in names[first:] + names[:first]:
                seconds = seconds_per_update(name, args.timing_steps, Path(tmp) / f"t-{name}-{rep}")
                timings[name].append(seconds)
                print(f"[timing {rep + 1}/{args.reps}] {name}: {1e3 * seconds:.0f} ms/update")
        per_update = {name: statistics.median(t) for name, t in timings.items()}
        budget = WORD_STEPS * args.scale * per_update["word"]  # seconds of updates
        for name in names:
            steps = max(2, round(budget / per_update[name]))
            every = max(1, steps // WORD_VALIDATIONS)
            run_dir = Path(tmp) / name
            print(f"[train] {name}: {steps} updates, validation every {every}", flush=True)
            summary = train(
                name, [f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}"], run_dir
            )
            command = [
                sys.executable,
                "-m",
                "seqtrain.evaluate",
                f"ckpt={summary['best_checkpoint']}",
            ]
            test = json.loads(run(command, run_dir.with_suffix(".eval.log")).splitlines()[-1])
            spec = spec_of(read(summary["best_checkpoint"]))
            rows[name] = {"steps": steps, "summary": summary, "test": test, "spec": spec}
            print(f"[train] {name}: val {summary['val_bits_per_byte']:.3f} bits/byte")
    defaults = parser.parse_args([])
    smoke = any(getattr(args, k) != getattr(defaults, k) for k in ("timing_steps", "reps", "scale"))
    write_markdown(rows, per_update, args, smoke)


def write_markdown(
    rows: dict, per_update: dict[str, float], args: argparse.Namespace, smoke: bool
) -> None:
    """The table, written atomically (an interrupted run leaves the previous one)."""
    command = " ".join(["python scripts/bench_tokenizers.py", *sys.argv[1:]])
    py = ".".join(map(str, sys.version_info[:3]))
    lines = [
        "# What each tokenizer buys",
        "",
        *(["**A smoke run**: its figures are not for quoting.", ""] if smoke else []),
        f"`{command}`, Python {py} (its documentation topics are the text), "
        f"{os.cpu_count()} CPU cores. Every case is `+experiment=word_lm` with the tokenizer "
        "swapped (the script's docstring lists the overrides); each trained for the word "
        f"model's wall time of updates ({WORD_STEPS * args.scale:.0f} word updates), from "
        f"interleaved timings ({args.reps} x {args.timing_steps} updates, medians). Bits per "
        "byte: the split's summed loss in bits over its UTF-8 bytes; test: "
        "`seqtrain.evaluate` on the best checkpoint.",
        "",
        "| tokenizer | vocabulary | bytes/token | ms/update | updates | val bits/byte | "
        "test bits/byte | val ppl | test ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        summary, test, spec = row["summary"], row["test"], row["spec"]
        ppl = (f"{summary['val_ppl']:.1f}", f"{test['ppl']:.1f}") if name == "word" else ("", "")
        lines.append(
            f"| {name} | {spec.input_size:,} | {spec.bytes_per_token['val']:.2f} | "
            f"{1e3 * per_update[name]:.0f} | {row['steps']:,} | "
            f"{summary['val_bits_per_byte']:.3f} | {test['bits_per_byte']:.3f} | "
            f"{ppl[0]} | {ppl[1]} |"
        )
    partial = args.out.with_suffix(".md.part")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(args.out)
    print("\n".join(lines[-len(rows) - 2 :]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
