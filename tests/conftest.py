"""Shared fixtures: tiny models and corpora, so every test runs in seconds on a CPU."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# The README's `pytest` runs two workers (pytest-xdist): each computes on one thread, set before
# torch loads, or two workers' OpenMP threads on two cores wait on each other; `-n 0` takes every
# CPU. The count is fixed either way, for the runs the tests start too (trainer.threads=auto
# yields to OMP_NUM_THREADS): under auto alone it follows the load, and two runs whose thread
# counts changed at other moments differ at float rounding, which the exact-resume tests forbid.
os.environ.setdefault(
    "OMP_NUM_THREADS",
    "1" if "PYTEST_XDIST_WORKER" in os.environ else str(len(os.sched_getaffinity(0))),
)

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from seqtrain import train
from seqtrain.cli import CONF_DIR
from seqtrain.config import validate
from seqtrain.data import BYTES, Corpus, DataSpec
from seqtrain.model import ModelConfig, RecurrentModel
from seqtrain.tasks import LanguageModelling, build_model

# The default task: next-byte prediction.
BYTE_LM = LanguageModelling(DataSpec("tokens", BYTES.vocab_size, BYTES.vocab_size))
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
PLUGINS = ROOT / "tests" / "plugins"  # a user's own modules: cells, tasks, corpus sources
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# The scalars issue #2 requires of every run's TensorBoard events.
REQUIRED_SCALARS = (
    "train/loss",
    "train/bpc",
    "val/loss",
    "val/bpc",
    "train/bits_per_byte",  # every LM's common scale (equal to bpc with bytes)
    "val/bits_per_byte",
    "perf/tokens_per_s",
    "optim/lr",
    "optim/grad_norm",
)


@contextlib.contextmanager
def backend_flags(*flags: tuple[object, str, object]) -> Iterator[None]:
    """Set torch.backends flags, (module, name, value) each, and restore the old values.

    Not monkeypatch.setattr: these are properties torch computes on access, and pytest 9.2 undoes
    a patched attribute it did not find in the object's own namespace with delattr, which they
    refuse (AttributeError at teardown)."""
    old = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in old:
            setattr(obj, name, value)


def with_pythonpath(*paths: Path) -> dict[str, str]:
    """ENV with `paths` first on PYTHONPATH: a user's modules, found as a user's would be."""
    return {**ENV, "PYTHONPATH": os.pathsep.join([*map(str, paths), ENV.get("PYTHONPATH", "")])}


def seqtrain(
    *args: str,
    module: str = "seqtrain",
    cwd: Path | None = None,
    env: dict | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """`python -m <module> args` to completion, as a user runs it; `prefix` wraps the command
    (e.g. setpriv to drop root's file-access override)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=ENV if env is None else env,
        cwd=cwd,
        timeout=300,
    )


def start_run(run_dir: Path, overrides: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    """`python -m seqtrain` in its own process (to be signalled or killed), run directory pinned."""
    args = [sys.executable, "-m", "seqtrain", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def composed(*overrides: str):
    """conf/train.yaml composed with `overrides` by Hydra, as the command line composes it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_in_process(run_dir: Path, *overrides: str, stop_at_start: bool = False) -> dict:
    """What `python -m seqtrain overrides` trains, in this process: the config composed and
    checked, every startup check (`train.prepare`), then `train.fit`; returns the summary.

    A test whose subject is not the process (its signals, exit code or console) calls this
    instead of a subprocess: the run costs its training, not a Python start and its imports.
    `stop_at_start` sends this process SIGTERM right before the first update, as a user's stop
    would land: the run saves after that update and returns a summary with `stopped_by`."""
    job = train.prepare(validate(composed(*overrides)), run_dir)
    stop = (lambda: signal.raise_signal(signal.SIGTERM)) if stop_at_start else None
    return train.fit(job, stop)


def refusal(main: Callable[..., None], *args: object, capsys: pytest.CaptureFixture) -> str:
    """Run a command's `main` in this process and expect a refusal: exit status 2 and one line
    on stderr, which is returned. (The command line's own: monkeypatch sys.argv, call cli.main.)"""
    with pytest.raises(SystemExit) as exit_:
        main(*args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert err.startswith("seqtrain: error: ") and "\n" not in err, err
    return err


def assert_exact_resume_in_process(tmp_path: Path, args: Sequence[str]) -> dict:
    """`args` trained once uninterrupted and once stopped by SIGTERM at the first update, then
    resumed with resume=auto: every step's train/loss must be bit-identical, and so the final
    figures. Returns both summaries."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    expected = run_in_process(reference, *args)
    assert run_in_process(stopped, *args, stop_at_start=True)["stopped_by"] == "SIGTERM"
    resumed = run_in_process(stopped, *args, "resume=auto")
    for tag in ("train/loss", "val/loss"):  # every update, and every validation at its step
        assert read_scalars(stopped, tag) == read_scalars(reference, tag) != {}, tag
    assert resumed["resumed_from"] and resumed["steps"] == expected["steps"]
    return {"reference": expected, "resumed": resumed}


def assert_exact_resume(tmp_path: Path, args: Sequence[str], env: dict[str, str]) -> dict:
    """assert_exact_resume_in_process through the command line, for what only a process shows
    (ddp ranks): stopped by a real SIGTERM at the startup line, resumed by a second process."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    code, _, err = finish(start_run(reference, args, env))
    assert code == 0, err[-2000:]
    proc = start_run(stopped, args, env)
    for line in proc.stdout:
        if "model:" in line:  # the startup line: signal handlers are installed
            proc.send_signal(signal.SIGTERM)
            break
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    code, _, err = finish(start_run(stopped, [*args, "resume=auto"], env))
    assert code == 0, err[-2000:]
    expected = read_scalars(reference, "train/loss")
    assert expected and read_scalars(stopped, "train/loss") == expected  # every step
    summaries = [json.loads((d / "summary.json").read_text()) for d in (reference, stopped)]
    assert summaries[1]["resumed_from"] and summaries[1]["steps"] == summaries[0]["steps"]
    return {"reference": summaries[0], "resumed": summaries[1]}


@pytest.fixture(autouse=True)
def loggers_as_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test leaves the root and seqtrain loggers as it found them: an in-process
    `cli.main` lets Hydra point their handlers at the test's captured streams, which are closed
    after it, and a later test would log into them ('--- Logging error ---')."""
    for name in ("", "seqtrain"):
        logger = logging.getLogger(name)
        for attr in ("handlers", "level", "disabled", "propagate"):
            value = getattr(logger, attr)
            monkeypatch.setattr(logger, attr, list(value) if attr == "handlers" else value)


@pytest.fixture
def tiny_model() -> RecurrentModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(embedding_size=8, hidden_size=12, num_layers=2), BYTE_LM)


def counting_corpus(n: int, doc_starts: list[int] | None = None) -> Corpus:
    """Token i is i % 256: a position is readable from its token."""
    tokens = (np.arange(n) % 256).astype(np.uint8)
    return Corpus(tokens, np.array(doc_starts or [0], dtype=np.int64), "counting")


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    what: str,
    atol: float = 1e-5,
    scaled: bool = False,
) -> None:
    """|actual - expected| <= atol everywhere (times max(1, max |expected|) when `scaled`: long
    sums grow), shapes equal; a failure reports the max and mean difference, not a boolean."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    if not expected.numel():
        return
    diff = (actual.double() - expected.double()).abs()
    scale = max(1.0, expected.abs().max().item()) if scaled else 1.0
    assert diff.max() <= atol * scale, (
        f"{what}: max diff {diff.max():.3g}, mean {diff.mean():.3g} > {atol:g} x {scale:.3g}"
    )


def read_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar over every event file of a run (later wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
        if tag in acc.Tags()["scalars"]:
            events += acc.Scalars(tag)
    return {e.step: e.value for e in sorted(events, key=lambda e: e.wall_time)}


def tensorboard_points(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar as TensorBoard shows it: the run's event files read together,
    in order, with the points a later writer purged dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
