"""A stop request ends the run within seconds: validation skipped or abandoned, checkpoint kept."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from seqtrain.callbacks import Preemption
from seqtrain.checkpoint import read

from .conftest import start_run
from .test_cli import ENV

# A validation pass after every update, over 600 KB of val text with a 128-wide LSTM: each pass
# takes several seconds, updates milliseconds, so a signal almost surely lands in validation.
VALIDATING = [
    "+debug=tiny",
    "data.max_bytes=12000000",
    "model.hidden_size=128",
    "trainer.max_steps=1000",
    "trainer.val_check_interval=1",
    "trainer.sample_length=0",
]


def started(run_dir: Path) -> subprocess.Popen:
    """A VALIDATING run, returned once its first validation pass is under way."""
    proc = start_run(run_dir, VALIDATING, ENV)
    for line in proc.stdout:
        if "measured" in line:  # the memory line, the last one before training starts
            time.sleep(2.0)
            return proc
    raise AssertionError(f"the run never started: {proc.stderr.read()[-2000:]}")


def wait(proc: subprocess.Popen) -> tuple[int, float, str]:
    start = time.perf_counter()
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, time.perf_counter() - start, out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_validation_stops_within_seconds(sig, tmp_path: Path) -> None:
    proc = started(tmp_path)
    proc.send_signal(sig)
    code, seconds, out = wait(proc)
    assert code == 128 + sig, out[-2000:]
    assert seconds < 5, f"{seconds:.1f} s from the signal to the exit"
    ckpt = read(tmp_path / "checkpoints" / "last.ckpt")  # complete, with the loop state
    assert ckpt["global_step"] >= 1 and "seqtrain" in ckpt
    assert "stopping after the current update" in out
    assert "resume with:" in (tmp_path / "cli.log").read_text()  # the console's last lines too


@pytest.mark.slow
def test_a_third_signal_aborts_at_once(tmp_path: Path) -> None:
    proc = started(tmp_path)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code, seconds, out = wait(proc)
    assert code == 128 + signal.SIGINT and seconds < 5, out[-2000:]
    assert "aborting now" in out
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):  # any file there is a complete one
        read(ckpt)


def test_a_second_signal_says_the_save_is_under_way(tmp_path: Path, caplog) -> None:
    preemption = Preemption(tmp_path / "last.ckpt")
    try:
        preemption._handle(signal.SIGINT, None)
        preemption.saving = True
        preemption._handle(signal.SIGINT, None)
    finally:
        preemption.teardown(None, None, "fit")
    messages = [r.getMessage() for r in caplog.records]
    assert "stopping after the current update" in messages[0]
    assert f"still saving {tmp_path / 'last.ckpt'}" in messages[1]
    assert preemption.signal_name == "SIGINT"
