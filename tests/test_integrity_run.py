"""Issue #24, the run side: every failure is one line and releases what it holds, summaries never
hold invented figures, and a refused run writes nothing into a folder it does not own."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import lightning
import pytest
import torch.distributed

from seqtrain import cli, report, rundir, train
from seqtrain.config import validate

from .conftest import ENV, PLUGINS, finish, seqtrain, start_run, with_pythonpath
from .test_config import composed
from .test_ownership import main

TINY = ["+debug=tiny", "trainer.sample_length=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run folder (checkpoints at step 6 and summary.json)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train.fit(train.prepare(validate(composed(*TINY)), run_dir))
    return run_dir


def copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    run_dir = tmp_path / name
    shutil.copytree(finished, run_dir)
    return run_dir


# Summaries never hold invented figures.


def test_resume_that_trains_nothing_writes_no_zero_throughput(
    finished, tmp_path, monkeypatch, capsys
) -> None:
    """A stop at the last step leaves last.ckpt at trainer.max_steps and no summary.json; its
    resume runs no update, so it measured no throughput and no memory: null with the reason."""
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "summary.json").unlink()
    assert main(monkeypatch, "resume=auto", f"hydra.run.dir={run_dir}") == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in train.UPDATE_FIGURES:
        assert summary[key] is None, (key, summary[key])
    assert "no update ran" in summary["figures_note"]
    assert summary["steps"] == 6 and summary["val_bpc"] > 0  # the real figures stay
    out = capsys.readouterr().out
    assert "0 tokens/s" not in out and "no update ran" in out


def test_resume_that_trains_nothing_keeps_the_earlier_runs_figures(finished, tmp_path) -> None:
    """ckpt_path= of a finished run into a new folder: the figures of the run that wrote it."""
    source = copy_run(finished, tmp_path, "source")
    earlier = json.loads((source / "summary.json").read_text())
    cfg = validate(composed(*TINY, f"ckpt_path={source / 'checkpoints' / 'last.ckpt'}"))
    summary = train.fit(train.prepare(cfg, tmp_path / "new"))
    for key in train.UPDATE_FIGURES:
        assert summary[key] == earlier[key], key
    assert earlier["tokens_per_s"] > 0 and summary["figures_from"] == str(source / "summary.json")


# Every failure is one line and releases what it holds.


def test_sweep_job_failing_with_a_plain_exception_is_reported_with_its_overrides(
    tmp_path,
) -> None:
    """A plug-in's ValueError inside training: the job's error.txt names it in one line (with
    the plug-in's frame), the other job trains, and the report lists the job as failed under its
    own overrides (not as shared ones)."""
    root = tmp_path / "sweep"
    done = seqtrain(
        "-m",
        *TINY,
        "data.max_bytes=20000",
        "trainer.max_steps=4",
        f"hydra.sweep.dir={root}",
        "+callbacks.boom._target_=boom.Boom",
        "+callbacks.boom.at_step=0,2",
        env={**with_pythonpath(PLUGINS), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    error = (root / "1" / "error.txt").read_text()
    assert error.startswith("ValueError: boom at step 2 (raised at ") and "boom.py" in error
    assert error.count("\n") == 1 and "Traceback" not in done.stderr
    assert (root / "0" / "summary.json").is_file() and not (root / "1" / ".seqtrain.lock").exists()
    built = report.build([root])
    failed = next(job for job in built.jobs if job.path.name == "1")
    assert failed.status.startswith("failed: ValueError: boom")
    assert built.swept == ["callbacks.boom.at_step"] and failed.overrides[built.swept[0]] == "2"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_failure_before_training_releases_the_lock(tmp_path, monkeypatch, capsys, stop) -> None:
    """Ctrl-C during tokenization (here: inside prepare) is one line and exit 130, not a
    traceback; a plain exception keeps its traceback. Either way the lock is gone and the folder
    the run created is removed."""

    def interrupted(cfg, run_dir):
        assert (run_dir / ".seqtrain.lock").is_file()  # held while preparing
        raise stop("during tokenization")

    monkeypatch.setattr(train, "prepare", interrupted)
    run_dir = tmp_path / "run"
    if stop is KeyboardInterrupt:
        assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 130
        err = capsys.readouterr().err.strip()
        assert err.startswith("seqtrain: error: interrupted (SIGINT) before training") and (
            "\n" not in err
        )
    else:
        assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 1  # Hydra printed the traceback
        assert "RuntimeError: during tokenization" in capsys.readouterr().err
    assert not run_dir.exists()


def test_sigterm_before_training_is_one_line_and_releases_the_lock(
    tmp_path, monkeypatch, capsys
) -> None:
    """SIGTERM while the corpus is read (before Preemption owns the signal): one line, exit 143,
    no lock left, and the signal's old handler back."""

    def terminated(cfg, run_dir):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(train, "prepare", terminated)
    before = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    (run_dir / "keep").mkdir(parents=True)  # not the run's to remove
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: interrupted (SIGTERM) before training") and (
        "\n" not in err
    )
    assert not (run_dir / ".seqtrain.lock").exists() and (run_dir / "keep").is_dir()
    assert signal.getsignal(signal.SIGTERM) == before


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "tensorboard/events.out.tfevents")


def test_tensorboard_on_a_full_disk_is_one_line_and_the_run_goes_on(
    tmp_path, monkeypatch, capsys
) -> None:
    """The TensorBoard writer hits a full disk (or a read-only tensorboard/) first: one WARNING,
    the curves stop, and the checkpoints and summary are still written."""
    from torch.utils.tensorboard import writer

    monkeypatch.setattr(writer.FileWriter, "__init__", no_space)
    run_dir = tmp_path / "run"
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert text.count("cannot write") == 1 and "no space left on device" in text, text
    assert "Traceback" not in text
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "summary.json").is_file()


class FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_run_log_on_a_full_disk_is_one_line_and_the_run_goes_on(
    tmp_path, monkeypatch, capsys
) -> None:
    """cli.log (Hydra's file handler) cannot be written: one warning instead of a traceback per
    record, and the run completes."""
    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk())
    run_dir = tmp_path / "run"
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 0
    err = capsys.readouterr().err
    assert err.count("seqtrain: warning: cannot write") == 1 and "cli.log" in err, err
    assert "Logging error" not in err and "Traceback" not in err
    assert (run_dir / "summary.json").is_file()


def test_summary_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys) -> None:
    real = rundir.write_atomic

    def full(path, text):
        if path.name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(rundir, "write_atomic", full)
    run_dir = tmp_path / "run"
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: cannot write ") and "\n" not in err, err
    assert "summary.json (no space left on device)" in err and "resume with: " in err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / ".seqtrain.lock").exists()


def test_a_leftover_local_rank_is_one_line_at_once(tmp_path, monkeypatch, capsys) -> None:
    """LOCAL_RANK without WORLD_SIZE/MASTER_ADDR/MASTER_PORT: Lightning would take this process
    for a started rank and wait trainer.ddp_timeout for peers that never come."""
    for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    run_dir = tmp_path / "run"
    start = time.monotonic()
    code = main(
        monkeypatch, "trainer.devices=2", "trainer.ddp_timeout=600", f"hydra.run.dir={run_dir}"
    )
    assert code == 2 and time.monotonic() - start < 60
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: LOCAL_RANK=0 is set") and "\n" not in err, err
    assert "WORLD_SIZE, MASTER_ADDR, MASTER_PORT" in err and not run_dir.exists()


def test_a_peer_killed_under_ddp_is_one_line_on_the_survivor(tmp_path, monkeypatch, capsys) -> None:
    """gloo's error on the rank that survives a killed peer, as Lightning raises it from fit."""

    def peer_died(*args, **kwargs):
        raise torch.distributed.DistBackendError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.1]:29500\nException raised from recvBytes at ..."
        )

    monkeypatch.setattr(lightning.Trainer, "fit", peer_died)
    run_dir = tmp_path / "run"
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: DDP: another rank stopped during training") and (
        "\n" not in err
    ), err
    assert "Connection closed by peer" in err and not (run_dir / ".seqtrain.lock").exists()


@pytest.mark.parametrize(
    "folder", ["/tmp/my runs/a", "/tmp/it's, (b)=c", '/tmp/q"uote\\x', "/tmp/a"]
)
def test_resume_command_pastes_into_a_shell_and_hydra(folder, monkeypatch) -> None:
    """Every argument shell-quoted, the folder quoted for Hydra as well: what the shell splits
    and Hydra parses is the folder and the overrides as they were."""
    from types import SimpleNamespace

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = ["+debug=tiny", "data.path=/tmp/my corpus.txt", "resume=auto"]
    hydra = SimpleNamespace(overrides=SimpleNamespace(task=overrides))
    monkeypatch.setattr(cli.HydraConfig, "get", lambda: hydra)
    args = shlex.split(cli.resume_command(Path(folder)))
    assert args[:3] == ["python", "-m", "seqtrain"]
    parsed = OverridesParser.create().parse_overrides(args[3:])
    values = {o.key_or_group: o.value() for o in parsed}
    assert values["hydra.run.dir"] == folder and values["data.path"] == "/tmp/my corpus.txt"
    assert values["resume"] == "auto" and len(parsed) == 4


# A refused run writes nothing into a folder it does not own.


@pytest.mark.parametrize("args", [[], ["resume=auto", "data.batch_size=2"]])
def test_a_refused_run_leaves_the_folders_log_as_it_was(finished, tmp_path, monkeypatch, args):
    """The folder holds another run (its cli.log included): the refusal (a fresh start over it,
    or a resume with a setting that would make it wrong) appends nothing to that log."""
    run_dir = copy_run(finished, tmp_path)
    log = run_dir / "cli.log"
    log.write_text("the earlier run's log\n")
    assert main(monkeypatch, *args, f"hydra.run.dir={run_dir}") == 2
    assert log.read_text() == "the earlier run's log\n"


def test_a_run_refused_by_the_folders_lock_writes_nothing_into_it(tmp_path, monkeypatch) -> None:
    """The folder is a live run's (its lock: pid 1 is alive): the empty cli.log Hydra opens for
    the refused run was left in it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.LOCK).write_text(f"1 {socket.gethostname()}\n")
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 2
    assert [p.name for p in run_dir.iterdir()] == [rundir.LOCK]


def test_a_run_that_starts_keeps_what_it_logged_while_preparing(tmp_path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 0
    text = (run_dir / "cli.log").read_text()
    assert "corpus python-stdlib" in text and "model:" in text and "val/bpc:" in text


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog) -> None:
    import socket
    import subprocess

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    (tmp_path / rundir.LOCK).write_text(f"{gone.pid} {socket.gethostname()}\n")
    lock = rundir.acquire(tmp_path)
    assert lock is not None and rundir.owner(lock) == (os.getpid(), socket.gethostname())
    assert f"stale lock of pid {gone.pid}" in caplog.text
    rundir.release(lock)
    assert not lock.exists()


def test_a_bad_stale_age_is_one_line(tmp_path, monkeypatch) -> None:
    (tmp_path / rundir.LOCK).write_text("4242 node-17.cluster\n")
    monkeypatch.setenv(rundir.STALE_HOURS, "soon")
    with pytest.raises(rundir.ConfigError, match="SEQTRAIN_LOCK_STALE_HOURS=soon: must be a posi"):
        rundir.acquire(tmp_path)


def test_sigterm_after_training_names_the_resume_command(tmp_path, monkeypatch, capsys) -> None:
    """SIGTERM once Preemption has handed the signal back (final validation, summary.json):
    one line with the command that resumes from the saved checkpoint, the lock released."""
    real = train.write_summary

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "write_summary", terminated)
    run_dir = tmp_path / "run"
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: interrupted (SIGTERM) after training; resume with: ")
    assert "\n" not in err and "resume=auto" in err
    assert not (run_dir / ".seqtrain.lock").exists()


def test_a_read_only_run_log_is_one_line_before_hydra_opens_it(
    finished, tmp_path, monkeypatch, capsys
) -> None:
    """Hydra opens cli.log before seqtrain runs: a read-only one would be Hydra's traceback.
    (Root writes any file, so the permission is faked through os.access.)"""
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "cli.log").write_text("the run's log\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "cli.log" and real(p, mode))
    assert main(monkeypatch, "resume=auto", f"hydra.run.dir={run_dir}") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("its cli.log is not writable; fix its permissions or choose another folder")
    assert "\n" not in err


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (/proc: Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_peer_killed_under_real_ddp_is_one_line_on_the_survivor(tmp_path) -> None:
    """Two CPU ranks (gloo); rank 1 is SIGKILLed mid-training: rank 0 says so in one line."""
    args = [
        *TINY,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "trainer.ddp_timeout=60",
        "trainer.progress_every=1",
    ]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    proc = start_run(tmp_path / "run", args, env)
    for line in proc.stdout:
        if "step " in line:  # both ranks train
            break
    peers = children(proc.pid)
    assert peers, "no rank 1 process"
    for pid in peers:
        os.kill(pid, signal.SIGKILL)
    code, _, err = finish(proc)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "seqtrain: error: DDP: another rank stopped during training" in err, err[-3000:]
    assert not (tmp_path / "run" / ".seqtrain.lock").exists()
