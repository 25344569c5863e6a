"""Check that the docs tell the truth: every command in README.md and docs/*.md runs, and every
config key they name exists.

    python scripts/check_docs.py          # every command, cut down to a few updates (minutes)
    python scripts/check_docs.py --fast   # keys, every training command composed and validated
                                          #   in this process, and a handful of cheap ones run

Commands come from fenced code blocks (no language, or bash/sh/shell/console) and from inline
code spans that start with `python -m seqtrain`, `seqtrain ` or `python scripts/`. Each runs in a
temporary folder that holds the files the docs' placeholders name (`my_corpus.txt`, `x.npy`,
`outputs/.../checkpoints/last.ckpt` and `/tmp/x/trained/...`: a run the script trains first,
`multirun/DATE/TIME`: the sweep before it, ...), training commands with CUT appended (3 updates).
A line `$ command` is an error example: it must exit 2 and print the doc's next line; a command in
a table row of docs/errors.md must exit 2. What needs a GPU, SLURM, the network, an optional
extra or a long time is skipped with its reason (SKIP; SLOW in --fast). Every failure is one line
`FILE:LINE: why`; the exit status is 1 when any failed. Keys are dotted names in code spans and
commands whose first part is a top-level config group (`data.foo`), checked against the config
composed with every option of every group; NOT_KEYS lists the look-alikes.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from seqtrain.cli import CONF_DIR
from seqtrain.config import validate

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What is not run, and why: the first pattern that matches a command names its reason.
SKIP = [
    (r"data=tinyshakespeare", "needs the network (downloads tinyshakespeare)"),
    (r"hydra/launcher=slurm|\[slurm\]", "needs SLURM and the slurm extra"),
    (r"hparams_search=|\[optuna\]", "needs the optuna extra"),
    (r"trainer\.num_nodes|trainer\.devices=[3-9]", "needs GPUs"),
    (r"^pip |^python -m venv|^/tmp/v/bin/", "installs packages"),
    (r"^pytest|-m pytest", "the test suite: CI runs it"),
    (r"^ruff ", "lint: CI runs it"),
    (r"^bash |^python scripts/", "a script with its own checks (benchmarks, CI, GPU)"),
    (r"^tensorboard ", "starts a server"),
    (r"(^| |=)\.\.\.( |$)", "abbreviated (`...`)"),
    (r"<\w|[A-Z]+_DIR|\[MORE", "a template with placeholders"),
    (
        r"^python -m seqtrain\.(sample|evaluate|recall)( split=\w+)?$",
        "names the tool, no checkpoint",
    ),
]
# Run in full mode only: each costs a minute or more on 2 CPU cores.
SLOW = [
    (r"model\.backend=compile", "compiles"),
    (r"trainer\.devices=2", "starts DDP processes"),
    (
        r"seqtrain (-m|--multirun)( |$)|^python -m seqtrain\.(report|recall) ",
        "a sweep or its report",
    ),
    (r"--config-dir", "needs Hydra's command line"),
]
BASE_CKPT = "outputs/base/checkpoints/last.ckpt"  # the run the script trains first
# Appended to a training command (the data keys where it does not set them itself): 3 updates of
# 2 streams on a sliver of the corpus. The model keeps its size (+debug=tiny's would break what
# the command says about sizes: tied weights, projections).
CUT = [
    "data.max_bytes=60000",
    "data.batch_size=2",
    "data.eval_batch_size=1",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "optim.schedule.warmup_steps=0",  # else a warning that 3 updates cannot warm up
]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
COMMAND_START = re.compile(
    r"^(\$ )?([A-Z_]+=\S+ )*(python |python3 |seqtrain |pip |pytest|ruff |bash |tensorboard "
    r"|/tmp/v/bin/)"
)
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=(\"[^\"]*\"|\S+)$")
INLINE = re.compile(r"`([^`]+)`")
INLINE_COMMAND = re.compile(r"^([A-Z_]+=\S+ )*(python -m seqtrain|seqtrain |python scripts/)")
KEY = re.compile(r"(?<![\w./$-])(\+{0,2})([a-z_]+(?:\.[a-z_0-9]+)+)(?=[=\s,)]|$)")
FILE_SUFFIX = re.compile(r"\.(py|md|yaml|json|jsonl|npy|bin|txt|ckpt|log|csv|png|toml|sh|gz)$")
# Keys a doc may name that the composed config does not hold: Hydra's own, `+`-added ones.
NOT_CONFIG = ("hydra.",)
# Dotted names the docs use that look like keys and are not meant as ones.
NOT_KEYS = {
    "model.hiden_size": "the typo of the error examples",
    "model.head.weight": "a model's parameter",
    "model.embedding.weight": "a model's parameter",
    "trainer.clip": "the bad input of an error example (`+trainer.clip=1`)",
    "task.generate": "a method of seqtrain.tasks' tasks",
    "task.random_batch": "a method of seqtrain.tasks' tasks",
    "callbacks.x._target_": "the bad input of an error example (`+callbacks.x._target_=...`)",
    "logger.x._target_": "the bad input of an error example (`+logger.x._target_=...`)",
    "optim.optimizer.eps": "the bad input of an error example (`+optim.optimizer.eps=-1`)",
}


@dataclass
class Command:
    file: Path
    line: int
    text: str  # one shell command, comments stripped, `$ ` removed
    expect: str | None = None  # an error example: the line the docs print after it
    table: bool = False  # a row of docs/errors.md's tables of bad inputs: must exit 2

    @property
    def where(self) -> str:
        return f"{shown(self.file)}:{self.line}"


def shell_join(tokens: list[str]) -> str:
    """shlex.join, but `$NAME` and `NAME=$NAME` stay unquoted so the shell expands them."""
    return " ".join(
        t if re.fullmatch(r"[\w.:/=+-]*\$\w+[\w./:-]*", t) else shlex.quote(t) for t in tokens
    )


def split_commands(text: str) -> list[str]:
    """One source line (continuations joined) -> its commands: comments dropped, `&&` split."""
    tokens = shlex.split(text, comments=True)
    parts, part = [], []
    for token in tokens:
        if token in ("&&", ";"):
            parts.append(part)
            part = []
        else:
            part.append(token)
    return [shell_join(p) for p in [*parts, part] if p]


def without_fences(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept), for the inline spans."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def commands(path: Path) -> Iterator[Command]:
    """The commands of one doc, in order: fenced shell blocks, then inline spans."""
    lines = path.read_text().splitlines()
    lang, env, i = None, {}, 0  # env: the block's `NAME="..."` lines, for its `$NAME`
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            env = {}
            i += 1
            continue
        start = i
        if lang in SHELL_BLOCKS:
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            if ASSIGNMENT.match(line.strip()):
                name, _, value = line.strip().partition("=")
                env[name] = shlex.split(value)[0]
            elif COMMAND_START.match(line):
                error_example = line.startswith("$ ")
                expect = lines[i + 1] if error_example and i + 1 < len(lines) else None
                for name, value in env.items():
                    line = line.replace(f"${name}", value)
                for text in split_commands(line.removeprefix("$ ")):
                    yield Command(path, start + 1, text, expect)
        i += 1
    text = without_fences("\n".join(lines))
    for match in INLINE.finditer(text):
        span = " ".join(match.group(1).split())
        if INLINE_COMMAND.match(span):
            line = text.count("\n", 0, match.start()) + 1
            bad_input = path.name == "errors.md" and lines[line - 1].startswith("|")
            for part in split_commands(span):
                yield Command(path, line, part, expect="" if bad_input else None, table=bad_input)


def doc_keys(path: Path) -> Iterator[tuple[int, str]]:
    """(line, key) for every config key the doc names: in code spans and in commands."""
    text = without_fences(path.read_text())
    for match in INLINE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        yield from ((line, key) for key in keys_in(match.group(1)) if key not in NOT_KEYS)
    for command in commands(path):
        if re.match(r"([A-Z_]+=\S+ )*(python -m seqtrain|seqtrain)( |$)", command.text):
            keys = keys_in(command.text)
            yield from ((command.line, key) for key in keys if key not in NOT_KEYS)


def keys_in(text: str) -> Iterator[str]:
    for plus, key in KEY.findall(text):
        if not plus and not FILE_SUFFIX.search(key) and not key.startswith(NOT_CONFIG):
            yield key


@functools.cache
def config_keys() -> frozenset[str]:
    """Every dotted key of the composed config, under every option of every config group."""
    groups = [
        f"{group.name}={option.stem}"
        for group in sorted(CONF_DIR.iterdir())
        if group.is_dir() and group.name not in ("hydra", "hparams_search", "debug")
        for option in sorted(group.glob("*.yaml"))
    ]
    keys: set[str] = set()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for override in ["", *groups]:
            override = "+" + override if override.startswith("experiment=") else override
            cfg = compose("train", overrides=[override] if override else [])
            keys |= set(dotted(OmegaConf.to_container(cfg)))
    return frozenset(keys)


def dotted(node: object, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            yield prefix + str(name)
            yield from dotted(value, f"{prefix}{name}.")


def check_keys(docs: list[Path] = DOCS) -> list[str]:
    """One line per key a doc names that no composition of the config holds."""
    known = config_keys()
    top = {key for key in known if "." not in key}
    return [
        f"{shown(path)}:{line}: {key} is not a config key"
        for path in docs
        for line, key in doc_keys(path)
        if key.split(".")[0] in top and key not in known and not code_name(key)
    ]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def code_name(key: str) -> bool:
    """`data.load_splits`, `memory.checkpointed`: a function of a seqtrain module, not a key."""
    module, name = key.split(".")[:2]
    try:
        return hasattr(importlib.import_module(f"seqtrain.{module}"), name)
    except ImportError:
        return False


def make_files(work: Path) -> None:
    """The files the docs' placeholders name, small, in the folder the commands run in."""
    text = b"".join(p.read_bytes() for p in DOCS)[:120_000]
    for name in ("my_corpus.txt", "corpus.txt", "ptb.train.txt", "x.txt"):
        (work / name).write_bytes(text)
    (work / "corpus").mkdir()
    for k in range(4):
        (work / "corpus" / f"{k}.txt").write_bytes(text[k * 30_000 : (k + 1) * 30_000])
    records = (text[k : k + 300].decode(errors="ignore") for k in range(0, 90_000, 300))
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    rng = np.random.default_rng(0)
    rng.integers(0, 50257, 60_000).astype(np.uint16).tofile(work / "train.bin")
    series = np.sin(np.arange(20_000) / 7.0)[:, None] * np.ones((1, 3))
    np.save(work / "x.npy", series.astype(np.float32))
    np.save(work / "y.npy", series[:, :1].astype(np.float32))
    np.save(work / "starts.npy", np.array([0, 10_000], np.int64))
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([text.decode(errors="ignore")], trainer)
    tokenizer.save(str(work / "tokenizer.json"))
    (work / "tests").symlink_to(ROOT / "tests")
    for sub, body in (
        ("experiment/mine.yaml", "# @package _global_\ntbptt:\n  window: 32\n"),
        ("model/my_model.yaml", "hidden_size: 32\n"),
    ):
        (work / "my_conf" / sub).parent.mkdir(parents=True, exist_ok=True)
        (work / "my_conf" / sub).write_text(body)


class Runner:
    """Runs the commands in one temporary folder, keeping what earlier ones made."""

    def __init__(self, work: Path, fast: bool) -> None:
        self.work, self.fast = work, fast
        self.sweeps = 0
        self.last_sweep: str | None = None
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }

    def skip_reason(self, command: Command) -> str | None:
        if self.fast and command.table:
            return "a bad input of docs/errors.md (full mode runs it; tests/test_bad_input.py too)"
        for pattern, reason in SKIP + (SLOW if self.fast else []):
            if re.search(pattern, command.text):
                return reason + (" (full mode runs it)" if (pattern, reason) in SLOW else "")
        return None

    def shell(self, command: Command) -> tuple[str, bool]:
        """The command as it runs here, and whether it trains (in-process composable)."""
        text = command.text
        text = re.sub(r"(^| )(PYTHONPATH=)(\S+)", r"\1\2\3:$PYTHONPATH", text)
        text = text.replace("path/to/dir", "tests/plugins")
        text = re.sub(r"[^\s=]*(\.\.\.|/x/trained)/(checkpoints/)?last\.ckpt", BASE_CKPT, text)
        text = re.sub(r"(hydra\.(?:run|sweep)\.dir=)/", r"\1abs/", text)
        if re.search(r"multirun/\S+", text):
            if self.last_sweep is None:
                self.run_base_sweep()
            text = re.sub(r"multirun/\S+", self.last_sweep, text)
        trains = bool(
            re.match(r"([A-Z_]+=\S+ )*(python -m seqtrain|seqtrain)( |$)", text)
        ) and not re.search(r" (--help|--hydra-help|-sc|--cfg|--info)( |$)", text)
        if trains and command.expect is None:
            # the updates always (a later override wins), the sizes where the command sets none
            cut = [c for c in CUT if c.startswith("trainer.") or f" {c.split('=')[0]}=" not in text]
            if "+debug=tiny" in text:
                cut = [c for c in cut if c.startswith("trainer.")]
            text += " " + " ".join(cut)
            if re.search(r"seqtrain (-m|--multirun)( |$)", text):
                self.sweeps += 1
                self.last_sweep = f"multirun/sweep{self.sweeps}"
                text += f" hydra.sweep.dir={self.last_sweep}"
            elif "hydra.run.dir=" not in text:
                text += f" hydra.run.dir=runs/{command.file.stem}_{command.line}"
        return text, trains

    def run(self, command: Command, text: str) -> str | None:
        """None if `text` (the command as `shell` made it) did what the docs say, else why not."""
        start = time.monotonic()
        proc = subprocess.run(
            ["bash", "-c", text],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        seconds = time.monotonic() - start
        print(f"  {seconds:5.1f} s  exit {proc.returncode}  {text}", flush=True)
        if command.expect is not None:
            shown = command.expect.split("...")[0].strip()
            if proc.returncode != 2 or shown not in proc.stderr:
                got = f"exit {proc.returncode}: {last(proc.stderr)}"
                return f"expected exit 2 and {shown!r}, got {got}"
            return None
        if proc.returncode != 0:
            return f"exit {proc.returncode}: {last(proc.stderr or proc.stdout)}"
        return None

    def run_base_sweep(self) -> None:
        base = Command(ROOT / "README.md", 0, "python -m seqtrain -m model.hidden_size=16,24")
        self.run(base, self.shell(base)[0])

    def compose(self, text: str) -> str | None:
        """Fast mode: a training command's config composed and validated in this process."""
        for path in re.findall(r"PYTHONPATH=([^:\s]+)", text):
            if str(self.work / path) not in sys.path:
                sys.path.insert(0, str(self.work / path))
        tokens = shlex.split(text)
        overrides = [
            t
            for t in tokens[tokens.index("seqtrain") + 1 if "seqtrain" in tokens else 3 :]
            if t not in ("-m", "--multirun") and not t.startswith("hydra.")
        ]
        for k, t in enumerate(overrides):  # a sweep composes its first value of each list
            key, _, value = t.partition("=")
            if "," in value and not value.startswith("["):
                overrides[k] = f"{key}={value.split(',')[0]}"
        here = Path.cwd()
        os.chdir(self.work)  # where the files the command names are
        try:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                validate(compose("train", overrides=overrides))
        except Exception as e:
            return f"does not compose: {last(str(e))}"
        finally:
            os.chdir(here)
        return None


def last(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="keys, compositions, a few runs")
    args = parser.parse_args()
    start = time.monotonic()
    failures = check_keys()
    print(f"keys: {len(failures)} unknown", flush=True)
    cheap = re.compile(r"seqtrain\.(sample|evaluate) | (--help|-sc)( |$)")
    with tempfile.TemporaryDirectory(prefix="check_docs_") as tmp:
        work = Path(tmp)
        make_files(work)
        runner = Runner(work, args.fast)
        base = Command(ROOT / "README.md", 0, "python -m seqtrain hydra.run.dir=outputs/base")
        if error := runner.run(base, runner.shell(base)[0]):
            failures.append(f"(base run): {error}")
        seen: set[str] = set()
        for path in DOCS:
            for command in commands(path):
                if (reason := runner.skip_reason(command)) is not None:
                    print(f"{command.where}: skip ({reason}): {command.text}")
                    continue
                if command.text in seen:
                    continue
                seen.add(command.text)
                text, trains = runner.shell(command)
                print(f"{command.where}: {command.text}", flush=True)
                real = not args.fast or command.expect is not None or cheap.search(text)
                if args.fast and trains and not real:
                    error = runner.compose(text)
                else:
                    error = runner.run(command, text)
                if error:
                    failures.append(f"{command.where}: {error}")
    for failure in failures:
        print(failure)
    print(f"check_docs: {len(failures)} failures in {time.monotonic() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
