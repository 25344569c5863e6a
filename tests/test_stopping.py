"""A stop request ends the run within seconds: validation skipped or abandoned, checkpoint kept."""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqtrain.callbacks import Preemption
from seqtrain.checkpoint import read
from seqtrain.data import Window
from seqtrain.tbptt import Engine, UpdateAbandoned

from .conftest import BYTE_LM, PLUGINS, finish, read_scalars, start_run, with_pythonpath
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
    """The exit code, the seconds until it, and what the run printed on both streams."""
    start = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    return proc.returncode, time.perf_counter() - start, out + err


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
    assert "stopping; saving" in out
    assert "resume with:" in (tmp_path / "cli.log").read_text()  # the console's last lines too


@pytest.mark.slow
def test_ctrl_c_held_down_still_ends_in_one_stop(tmp_path: Path) -> None:
    """SIGINT every 20 ms from inside validation to the exit: the stop ends in seconds (often
    before a third signal), and whatever moment the later ones land in, the process exits
    with 130 after its resume line, never by an uncaught KeyboardInterrupt."""
    proc = started(tmp_path)
    start = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - start < 10:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    code, _, out = wait(proc)
    assert code == 128 + signal.SIGINT, out[-2000:]
    assert "resume with:" in out or "aborting now" in out
    assert "Traceback" not in out


# Three SIGINTs while the main thread is inside one long C call that releases the GIL, as a
# torch kernel does (a 6000-wide matmul on one thread, seconds): Python runs the handler once,
# after the call, for all three. Unaborted, the script ends with 0 after three of them.
COALESCED = """
import sys
from pathlib import Path
import torch
from seqtrain.callbacks import Preemption
torch.set_num_threads(1)
a = torch.randn(6000, 6000)
preemption = Preemption(Path(sys.argv[1]))
print("ready", flush=True)
for _ in range(3):
    a @ a
"""


def test_three_signals_during_one_c_call_abort_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", COALESCED, str(tmp_path / "last.ckpt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdout.readline() == "ready\n", proc.communicate()[1][-2000:]
    time.sleep(0.3)  # inside the first product
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code, seconds, out = wait(proc)
    assert code == 128 + signal.SIGINT, out[-2000:]
    assert seconds < 5, f"{seconds:.1f} s from the third signal to the exit"
    assert "SIGINT again: aborting now" in out


def test_a_second_signal_says_the_save_is_under_way(tmp_path: Path, caplog) -> None:
    preemption = Preemption(tmp_path / "last.ckpt")
    try:
        preemption._handle(signal.SIGINT, None)
        preemption.saving = True
        preemption._handle(signal.SIGINT, None)
    finally:
        preemption.teardown(None, None, "fit")
    messages = [r.getMessage() for r in caplog.records]
    assert "stopping; saving" in messages[0]
    assert f"still saving {tmp_path / 'last.ckpt'}" in messages[1]
    assert preemption.signal_name == "SIGINT"


# A window of 64 steps of a user cell that sleeps 0.15 s per step (training only), run as 8
# chunks of 8 (recomputed in backward): one update takes about 64 + 56 steps x 0.15 s = 18 s,
# far above the 5 s bound, while a signal can be acted on every 8 steps (about 1.2 s).
SLOW_UPDATES = [
    "+debug=tiny",
    "model.cell=slow_cells:SlowCell",
    "model.backend=modular",
    "tbptt.window=64",
    "memory.checkpoint=chunk",
    "memory.chunk=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=100",  # validated once, at the end
    "trainer.checkpoint_every=1",
    "trainer.progress_every=1",
    "trainer.sample_length=0",
]


@pytest.mark.slow
def test_a_signal_inside_a_slow_update_stops_within_seconds_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    """The update under way is dropped between two segments (forward, or backward's
    recomputation), the checkpoint is the last completed update's, and the resumed run's loss
    at every step equals an uninterrupted run's."""
    fast = with_pythonpath(PLUGINS)
    slow = {**fast, "SLOW_CELL_SECONDS": "0.15"}
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    code, _, err = finish(start_run(reference, SLOW_UPDATES, fast))
    assert code == 0, err[-2000:]
    proc = start_run(stopped, SLOW_UPDATES, slow)
    for line in proc.stdout:
        if "step 1/4" in line:  # the first update is done; the second takes ~18 s
            break
    time.sleep(random.Random().uniform(0.5, 12.0))  # in forward (~10 s) or backward
    proc.send_signal(signal.SIGTERM)
    start = time.perf_counter()
    for line in proc.stdout:
        if line.startswith("resume with:"):  # saved: the last line of a stopped run
            break
    saved = time.perf_counter() - start
    code, seconds, out = wait(proc)
    # 5 s: about 1 s to the next segment boundary, then one checkpoint save; an update run to its
    # end would take 6 s more at least. The exit after the last line is the interpreter's own
    # teardown, as after any stop, and stretches on a loaded machine: bounded separately.
    assert code == 128 + signal.SIGTERM, out[-2000:]
    assert saved < 5, f"{saved:.1f} s from the signal to the saved checkpoint"
    assert saved + seconds < 20, f"{saved + seconds:.1f} s from the signal to the exit"
    assert "was dropped unfinished" in (stopped / "cli.log").read_text()
    assert read(stopped / "checkpoints" / "last.ckpt")["global_step"] == 1
    code, _, err = finish(start_run(stopped, [*SLOW_UPDATES, "resume=auto"], fast))
    assert code == 0, err[-2000:]
    expected = read_scalars(reference, "train/loss")
    assert len(expected) == 4 and read_scalars(stopped, "train/loss") == expected


@pytest.mark.slow
def test_a_third_signal_aborts_at_once(tmp_path: Path) -> None:
    """Ctrl-C three times inside an update that has seconds to go before it can stop (one chunk
    of 64 slow steps): the first asks for the stop, the second says it is under way, the third
    exits at once, and the checkpoint of the last completed update stays whole."""
    overrides = [*SLOW_UPDATES, "memory.chunk=64"]
    proc = start_run(tmp_path, overrides, {**with_pythonpath(PLUGINS), "SLOW_CELL_SECONDS": "0.15"})
    for line in proc.stdout:
        if "step 1/4" in line:  # the second update's forward takes ~10 s, undroppable
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        if "stopping; saving" in line:
            break
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code, seconds, out = wait(proc)
    assert code == 128 + signal.SIGINT and seconds < 5, out[-2000:]
    assert "still finishing the update" in out and "SIGINT again: aborting now" in out
    assert read(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_the_stop_lines_reach_cli_log_when_stdout_is_a_closed_pipe(tmp_path: Path) -> None:
    """Ctrl-C on `seqtrain ... | tee log` ends tee first: the stop lines still reach cli.log,
    and the resume command is quoted for the shell (a path with a space pastes)."""
    run_dir = tmp_path / "a run"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "seqtrain", *VALIDATING, f"hydra.run.dir={run_dir}"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    os.close(write_end)
    with os.fdopen(read_end) as stdout:
        for line in stdout:
            if "measured" in line:  # training starts
                break
    # The reader is gone (closed above): every later write to stdout fails with EPIPE.
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert ", in say" not in err  # no traceback from the console lines
    log = (run_dir / "cli.log").read_text()
    assert "SIGINT: stopped after step" in log
    assert f"resume with: python -m seqtrain {' '.join(VALIDATING)} resume=auto " in log
    assert f"'hydra.run.dir={run_dir}'" in log


@pytest.mark.parametrize("asked_after", [1, 3, 6])  # forward's 2nd, 4th segment; in backward
def test_a_dropped_update_leaves_the_engine_and_weights_as_they_were(
    tiny_model, asked_after: int
) -> None:
    """A stop request met between segments raises before anything the next update or a
    checkpoint reads has changed: carried state, history and weights; only gradients (which the
    module zeroes) may be partly accumulated when it lands in backward."""
    engine = Engine(tiny_model, BYTE_LM, window=16, stride=8, chunk=4)
    tokens = torch.randint(0, 256, (2, 17))
    batch = Window(tokens[:, :-1], tokens[:, 1:], torch.zeros(2, 16, dtype=torch.bool), 1)
    engine.train_update(batch, lambda loss: loss.backward())  # state and history to carry

    def carried() -> list[torch.Tensor]:
        return [*engine.state, *engine.history, *tiny_model.state_dict().values()]

    before = copy.deepcopy(carried())
    calls = []
    engine.stop = lambda: calls.append(1) or len(calls) > asked_after
    with pytest.raises(UpdateAbandoned):
        engine.train_update(batch, lambda loss: loss.backward())
    after = carried()
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    engine.stop = lambda: False
    assert math.isfinite(engine.train_update(batch, lambda loss: loss.backward()).loss)
