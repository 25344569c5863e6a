"""Nothing lost, whatever the user does: a run owns its folder, resume never destroys what it could
not read, a finished run keeps its results, a full disk or a missing permission is one line, and a
failing sweep job fails alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seqtrain import cli, report
from seqtrain.checkpoint import newest_complete, read
from seqtrain.config import validate

from .conftest import composed, finish, seqtrain, start_run
from .test_cli import ENV

TINY = ["+debug=tiny", "trainer.sample_length=0"]
ENV = {**ENV, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run folder, through the command line (with its .hydra/ record)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = finish(start_run(run_dir, TINY, ENV))
    assert code == 0, err[-2000:]
    return run_dir


def copy_run(finished: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    return run_dir


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


def main(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["seqtrain", *TINY, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        cli.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_two_runs_in_one_folder_the_second_is_refused(tmp_path: Path) -> None:
    import signal

    run_dir = tmp_path / "run"
    long = ["trainer.max_steps=100000", "trainer.val_check_interval=100000"]
    first = start_run(run_dir, [*TINY, *long], ENV)
    for line in first.stdout:  # training is about to start: the first run owns the folder
        if "model:" in line:
            break
    seconds = []
    for resume in ([], ["resume=auto"]):  # a fresh start or a resume: both would overwrite
        seconds.append(seqtrain(*TINY, *resume, f"hydra.run.dir={run_dir}"))
    first.send_signal(signal.SIGTERM)
    code, out, err = finish(first)
    for second in seconds:
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by the run of pid {first.pid}" in second.stderr
        assert second.stderr.count("\n") == 1
    assert code == 128 + signal.SIGTERM, err[-2000:]
    step = int(out.split("stopped after step ")[1].split(";")[0])
    assert read(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step  # the first's
    assert not (run_dir / ".seqtrain.lock").exists()  # released at the end


def test_a_stale_lock_is_reported_and_taken_over(tmp_path: Path, monkeypatch, capsys) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".seqtrain.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(monkeypatch, f"hydra.run.dir={run_dir}") == 0
    assert f"stale lock of pid {dead.pid} (no such process); taking it over" in (
        capsys.readouterr().out
    )
    assert (run_dir / "summary.json").is_file() and not (run_dir / ".seqtrain.lock").exists()


def test_resume_of_a_finished_run_leaves_its_results(finished, tmp_path, monkeypatch) -> None:
    run_dir = copy_run(finished, tmp_path)
    before = snapshot(run_dir)
    assert main(monkeypatch, "resume=auto", f"hydra.run.dir={run_dir}") == 0
    assert snapshot(run_dir) == before  # summary.json, .hydra/, checkpoints, events as they were


def test_resume_takes_last_ckpt_not_a_later_best_ckpt(finished, tmp_path) -> None:
    """A stop writes last.ckpt; best.ckpt may be written later at the same step."""
    run_dir = copy_run(finished, tmp_path)
    best = run_dir / "checkpoints" / "best.ckpt"
    later = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime + 60
    os.utime(best, (later, later))
    assert newest_complete(run_dir) == run_dir / "checkpoints" / "last.ckpt"


def test_resume_skips_an_unreadable_version_and_says_so(finished, tmp_path, caplog) -> None:
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "checkpoints" / "last-v1.ckpt").write_bytes(b"garbage")
    assert newest_complete(run_dir) == run_dir / "checkpoints" / "last.ckpt"
    assert "skipped" in caplog.text and "last-v1.ckpt" in caplog.text


def test_resume_fresh_starts_over_when_asked(finished, tmp_path, monkeypatch) -> None:
    run_dir = copy_run(finished, tmp_path)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"cut")
    code = main(monkeypatch, "resume=fresh", "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    assert code == 0
    assert read(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_orphaned_temporaries_are_removed_at_start(finished, tmp_path, monkeypatch) -> None:
    run_dir = copy_run(finished, tmp_path)
    orphan = run_dir / "checkpoints" / ".last.ckpt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    assert main(monkeypatch, "resume=auto", "trainer.max_steps=7", f"hydra.run.dir={run_dir}") == 0
    assert not orphan.exists()


def test_a_refused_run_leaves_no_empty_folder(tmp_path, monkeypatch) -> None:
    run_dir = tmp_path / "new"
    assert main(monkeypatch, "data.path=/no/such.txt", f"hydra.run.dir={run_dir}") == 2
    assert not run_dir.exists()


def can_drop_root_override() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run([*DROP, "true"], capture_output=True, text=True, timeout=30, check=False)
    return probe.returncode == 0


DROP = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


@pytest.mark.skipif(not can_drop_root_override(), reason="needs root and setpriv")
def test_resume_over_an_unreadable_checkpoint_stops_and_keeps_it(finished, tmp_path) -> None:
    """Without root's override, as a user would meet it: a last.ckpt without read permission."""
    run_dir = copy_run(finished, tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = snapshot(run_dir)
    last.chmod(0)
    done = seqtrain(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", prefix=DROP)
    last.chmod(0o644)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0
    assert f"ckpt={last}: cannot read (Permission denied)" in done.stderr
    assert snapshot(run_dir) == before


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs, where the machine lets us mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last(
    finished, small_disk
) -> None:
    run_dir = small_disk / "run"
    shutil.copytree(finished, run_dir)
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - len(before) // 2))
    done = seqtrain(
        *TINY,
        "resume=auto",
        "trainer.max_steps=8",
        "trainer.checkpoint_every=1",
        f"hydra.run.dir={run_dir}",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "seqtrain: error: " in done.stderr and "no space left on device" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_a_failing_sweep_job_fails_alone(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    done = seqtrain(
        "-m",
        *TINY,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "tbptt.window=16,100000,8",  # the middle job's window needs more text than there is
        f"hydra.sweep.dir={root}",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 sweep job(s) failed" in done.stderr
    assert (root / "0" / "summary.json").is_file() and (root / "2" / "summary.json").is_file()
    assert "tbptt.window 100000" in (root / "1" / "error.txt").read_text()
    assert report.main([str(root)]) == 0
    table = (root / "report.md").read_text()
    assert "failed: " in table and table.count("| done |") == 2


def test_report_lists_bad_job_folders_as_bad_rows(tmp_path: Path) -> None:
    good = {"val_bpc": 2.0, "tokens_per_s": 100.0, "steps": 4, "monitor": "val/bpc"}
    bad = {
        "truncated": ("summary.json", '{"val_bpc": 2.'),
        "list": ("summary.json", "[1, 2]"),
        "overrides": (".hydra/overrides.yaml", "a: [unclosed"),
        "text": ("summary.json", json.dumps({**good, "val_bpc": "low", "steps": "four"})),
    }
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "summary.json").write_text(json.dumps(good))
    for name, (file, text) in bad.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / file).write_text(text)
        if file != "summary.json":
            (tmp_path / name / "summary.json").write_text(json.dumps(good))
    assert report.main([str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    assert table.count("| bad: ") == 3, table
    assert "5 jobs" in table


def test_max_bytes_reads_only_the_slice(tmp_path: Path, monkeypatch) -> None:
    from seqtrain import data

    big = tmp_path / "big.txt"
    big.write_bytes(b"abc" * 400_000)
    reads = []
    real = Path.open

    def counting_open(self, *args, **kwargs):
        f = real(self, *args, **kwargs)
        original = f.read
        if self.name == "big.txt":
            f.read = lambda n=-1: reads.append(n) or original(n)  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(Path, "open", counting_open)
    cfg = validate(composed(*TINY, f"data.path={big}", "data.max_bytes=60000"))
    corpus = data.load_corpus(cfg.data)
    assert len(corpus.values) == 60000 and reads == [60000]


def test_a_checkpoint_keeps_the_corpus_path_resolved(tmp_path: Path, monkeypatch) -> None:
    from seqtrain import train

    (tmp_path / "c.txt").write_bytes((Path(__file__).read_bytes() * 30)[:60000])
    monkeypatch.chdir(tmp_path)
    train.fit(train.prepare(validate(composed(*TINY, "data.path=c.txt")), tmp_path / "run"))
    saved = read(tmp_path / "run" / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert saved["data"]["path"] == str((tmp_path / "c.txt").resolve())  # evaluate from anywhere


def test_sample_takes_a_prompt_that_is_not_utf8(finished, capsys) -> None:
    from seqtrain import sample

    ckpt = finished / "checkpoints" / "last.ckpt"
    sample.main([f"ckpt={ckpt}", "prompt=\udcff\udcfe", "length=5"])  # bytes 0xff 0xfe, as argv
    assert capsys.readouterr().out.strip()
