"""A run owns its folder: a lock file names the owner; a refused run leaves no empty folder.

Two runs writing one folder overwrite each other's checkpoints, summary.json and `.hydra/`, and
mix two models under the same TensorBoard tags, so the second is refused in one line. The lock
holds the owner's pid and host: a lock of a dead process on this host is stale (the run was
killed) and is taken over, with a warning; one from another host cannot be checked, so it is
refused with the command that removes it once that run is known to be gone, and called stale when
it is older than SEQTRAIN_LOCK_STALE_HOURS (24 by default).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shlex
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from seqtrain.errors import ConfigError

log = logging.getLogger("seqtrain")
LOCK = ".seqtrain.lock"
TEMP_SUFFIX = ".tmp"  # atomic_file's temporary files: .NAME.RANDOM.tmp beside NAME


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) from a lock file; None when it is unreadable or half written."""
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


STALE_HOURS = "SEQTRAIN_LOCK_STALE_HOURS"  # another host's lock older than this is called stale


def stale_hours() -> float:
    value = os.environ.get(STALE_HOURS, "24")
    try:
        hours = float(value)
    except ValueError:
        hours = -1.0
    if not hours > 0:
        raise ConfigError(f"{STALE_HOURS}={value}: must be a positive number of hours")
    return hours


def other_host(run_dir: Path, lock: Path, pid: int, host: str) -> str:
    """Another host's process cannot be checked from here: its lock's age tells a live run (it
    was taken when the run started; a run lasts hours) from a lock left by a killed one."""
    try:
        hours = (time.time() - lock.stat().st_mtime) / 3600
    except OSError:
        hours = 0.0
    limit = stale_hours()
    if hours > limit:
        return (
            f"hydra.run.dir={run_dir}: its lock {lock} of pid {pid} on {host} is {hours:.0f} h "
            f"old (stale after {STALE_HOURS}={limit:g}): if that run is gone, remove it: "
            f"rm {shlex.quote(str(lock))}"
        )
    return (
        f"hydra.run.dir={run_dir}: in use by the run of pid {pid} on {host} (lock {lock}, taken "
        f"{hours:.1f} h ago); wait for it, or if that run is gone: rm {shlex.quote(str(lock))}"
    )


def acquire(run_dir: Path) -> Path | None:
    """Take run_dir's lock; the lock path, or None when this process's parent holds it (a
    multirun job run in its own process, train.fit_in_own_process). Raises ConfigError when
    another live run owns the folder or the folder cannot be written."""
    lock = run_dir / LOCK
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):  # a second try after removing a stale lock
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if run_dir.is_file() or not run_dir.is_dir():
                raise ConfigError(
                    f"hydra.run.dir={run_dir}: is a file; choose a folder for the run"
                ) from None
            held = owner(lock)
            if held is None:
                raise ConfigError(
                    f"hydra.run.dir={run_dir}: its lock {lock} is unreadable; if no run uses "
                    "the folder, delete the lock"
                ) from None
            pid, host = held
            if host == socket.gethostname() and pid == os.getppid():
                return None  # our parent process runs this job and holds the folder
            if host != socket.gethostname():
                raise ConfigError(other_host(run_dir, lock, pid, host)) from None
            if alive(pid):
                raise ConfigError(
                    f"hydra.run.dir={run_dir}: in use by the run of pid {pid} on {host} "
                    f"(lock {lock}); wait for it, or choose another hydra.run.dir"
                ) from None
            log.warning("%s: stale lock of pid %d (no such process); taking it over", lock, pid)
            lock.unlink(missing_ok=True)
            continue
        except OSError as err:
            reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror
            raise ConfigError(f"hydra.run.dir={run_dir}: cannot write ({reason})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock
    raise ConfigError(f"hydra.run.dir={run_dir}: its lock {lock} keeps coming back; try again")


def release(lock: Path | None) -> None:
    if lock is not None and owner(lock) == (os.getpid(), socket.gethostname()):
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file written whole or not at all: a temporary file in the same folder, fsynced,
    renamed over `path`; a kill or an error mid-write leaves the previous file as it was. The
    temporary file is removed on every way out (an error, Ctrl-C, SystemExit) and is locked
    while it is written, so `remove_stale_temporaries` tells a SIGKILL's leftover from a live
    writer's."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            with contextlib.suppress(OSError):  # a filesystem without locks: no sweep of it
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the group
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error, Ctrl-C, SystemExit (SIGTERM while tokenizing)
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write a whole text file or nothing (`atomic_file`)."""
    with atomic_file(path) as out:
        out.write(text.encode())


def remove_stale_temporaries(folder: Path, before: float) -> list[Path]:
    """Temporary files of `atomic_file` in folder that a SIGKILL left: older than `before` (this
    process's start) and locked by no writer. Each is removed with an INFO line."""
    removed = []
    for path in sorted(folder.glob(f".*{TEMP_SUFFIX}")):
        try:
            if path.stat().st_mtime >= before:
                continue
            with path.open("rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer holds it
                path.unlink()
        except OSError:  # locked (BlockingIOError), no locks here, gone, or not ours to remove
            continue
        log.info("removed %s, a temporary file left by a killed run", path)
        removed.append(path)
    return removed


def remove_orphans(run_dir: Path) -> list[Path]:
    """Temporary files of a checkpoint write that a kill interrupted (AtomicCheckpointIO)."""
    orphans = sorted((run_dir / "checkpoints").glob(".*.ckpt.*.tmp"))
    for path in orphans:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by a run killed while saving a checkpoint", path)
    return orphans


def discard_if_empty(run_dir: Path) -> None:
    """Remove a refused run's folder when nothing but empty log files is in it (Hydra creates
    the folder and its job log before seqtrain can check anything)."""
    try:
        entries = list(run_dir.iterdir())
        if all(p.is_file() and p.suffix == ".log" and p.stat().st_size == 0 for p in entries):
            for p in entries:
                p.unlink()
            run_dir.rmdir()
    except OSError:
        pass  # not ours to clean, or already gone
