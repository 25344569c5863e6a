"""Files and downloads: what `data.path` may name (a file, a directory, a glob), the checks that
make a missing, special or unreadable file one line, downloads with a checksum, the standard
library's sources, and NumPy arrays read with their shapes checked."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import stat
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from seqtrain.errors import DataError


def stdlib_files() -> list[Path]:
    """The running Python's own standard library sources, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def check_file(path: str | Path) -> Path:
    """A corpus file that exists and is regular; a FIFO or device would block or never end."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path}: no such file; pass an existing text file")
    if p.is_dir():
        raise DataError(f"data.path={path}: is a directory; pass a text file")
    if not p.is_file():
        raise DataError(
            f"data.path={path}: is not a regular file (a FIFO, device or socket); pass a text file"
        )
    return p


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[BinaryIO]:
    """A corpus file open for reading; a missing, special or unreadable one is one line naming
    data.path."""
    p = check_file(path)
    try:
        with p.open("rb") as f:
            yield f
    except OSError as err:
        raise DataError(
            f"data.path={path}: cannot read ({err.strerror}); check its permissions"
        ) from err


def read_bytes(path: str | Path, max_bytes: int | None = None) -> bytes:
    """The file's bytes, at most max_bytes of them (only those are read: a slice of a large
    file costs the slice)."""
    with opened(path) as f:
        try:
            return f.read() if max_bytes is None else f.read(max_bytes)
        except MemoryError:
            size = Path(path).expanduser().stat().st_size
            raise DataError(
                f"data.path={path}: {size:,} bytes do not fit in memory; set data.max_bytes to "
                "train on a slice"
            ) from None


def download(url: str, sha256: str | None, cache_dir: str | Path) -> Path:
    """Fetch url into cache_dir once, verifying the checksum; offline is a one-line error."""
    target = Path(cache_dir).expanduser() / Path(url).name
    if target.exists() and (sha256 is None or _sha256(target.read_bytes()) == sha256):
        return target
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"cannot download {url} ({getattr(err, 'reason', err)}); offline? "
            "pass data.path=/path/to/file.txt instead"
        ) from err
    if sha256 is not None and _sha256(raw) != sha256:
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {_sha256(raw)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    partial.write_bytes(raw)
    partial.replace(target)  # atomic: a killed download never leaves a truncated corpus behind
    return target


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def path_files(path: str) -> list[Path] | None:
    """The files data.path names, in sorted path order (path_entries)."""
    return path_entries(path)[0]


def path_entries(path: str) -> tuple[list[Path] | None, tuple[str, ...]]:
    """The files data.path names, in sorted path order, and a WARNING for what they leave out:
    every regular file below a directory (hidden files and folders skipped), or a glob's
    matches (`**` for any depth); None when it names one file. A FIFO, socket or device below
    it (reading one would block or never end) and a symlinked folder (not followed: a link may
    lead back up the tree) are skipped, each said in the warning, never silently."""
    p = Path(path).expanduser()
    skipped: list[Path] = []
    if p.is_dir():
        files = sorted(walk_files(p, path, skipped))
        if not files:
            raise DataError(
                f"data.path={path}: the directory holds no files (hidden ones are skipped"
                f"{', and ' + ', '.join(map(str, skipped)) if skipped else ''}); pass a "
                "directory of text files"
            )
        return files, left_out(path, skipped)
    if p.exists() or not any(c in path for c in "*?["):
        return None, ()
    check_glob_folders(p, path)
    files = []
    for match in sorted(Path(f) for f in glob.glob(str(p), recursive=True)):
        if match.is_file():
            files.append(match)
        elif match.exists() and not match.is_dir():
            skipped.append(match)  # a FIFO, socket or device the pattern matched
    if not files:
        raise DataError(f"data.path={path}: the glob matches no file; check the pattern")
    return files, left_out(path, skipped)


def left_out(path: str, skipped: list[Path]) -> tuple[str, ...]:
    """One WARNING line per kind of entry data.path's folder or glob held but no file read."""
    links = sorted(str(p) for p in skipped if p.is_symlink() and p.is_dir())
    special = sorted(str(p) for p in skipped if str(p) not in links)
    warnings = []
    if special:
        warnings.append(
            f"data.path={path}: skipped {', '.join(special)}: not regular files (a FIFO, "
            "socket or device would block or never end); move them out of the corpus"
        )
    if links:
        warnings.append(
            f"data.path={path}: skipped {', '.join(links)}: symlinked folders are not "
            "followed (a link may lead back up the tree); name the folder it links to as "
            "data.path, or copy its files in"
        )
    return tuple(warnings)


def check_glob_folders(pattern: Path, path: str) -> None:
    """glob skips a folder it cannot read, and the files in it would be missing: every folder
    the pattern's folder part matches must be readable, else one line."""
    parent = str(pattern.parent)
    folders = glob.glob(parent, recursive=True) if glob.has_magic(parent) else [parent]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        try:
            with os.scandir(folder):
                pass
        except OSError as err:
            raise DataError(
                f"data.path={path}: cannot read {folder} ({err.strerror}); check its "
                "permissions, or narrow the pattern"
            ) from None


def walk_files(root: Path, path: str, skipped: list[Path] | None = None) -> Iterator[Path]:
    """The regular files below root; a folder or file that cannot be read (no permission, no
    search permission, a dangling link) is one line, never skipped: its text would be missing.
    Symlinked folders and special files (FIFOs, sockets, devices) go to `skipped`."""
    skipped = [] if skipped is None else skipped

    def refuse(err: OSError) -> None:
        raise DataError(
            f"data.path={path}: cannot read {err.filename} ({err.strerror}); check its "
            "permissions, or name the folders to read with a glob"
        ) from None

    for folder, dirs, names in os.walk(root, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        skipped += [Path(folder, d) for d in dirs if Path(folder, d).is_symlink()]
        for name in names:
            if name.startswith("."):
                continue
            file = Path(folder, name)
            try:
                mode = file.stat().st_mode
            except OSError as err:
                refuse(err)
            if stat.S_ISREG(mode):
                yield file
            else:
                skipped.append(file)


def read_array(path: str, key: str, ndim: int) -> np.ndarray:
    """A .npy file as an array of `ndim` dimensions; anything else is one line naming `key`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}={path}: no such file; pass an existing .npy array")
    try:
        array = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{key}={path}: not a readable .npy array ({err})") from None
    if array.ndim != ndim:
        shape = "(N, F) rows of features" if ndim == 2 else "(D,) indices"
        raise DataError(f"{key}={path}: has shape {array.shape}; pass a {ndim}-D array, {shape}")
    return array


def read_rows(path: str, key: str) -> np.ndarray:
    """(N, F) finite float rows as float32."""
    array = read_array(path, key, 2)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{key}={path}: holds {array.dtype} values; pass floating-point numbers")
    if not np.isfinite(array).all():
        raise DataError(f"{key}={path}: holds NaN or infinite values; clean or drop those rows")
    return array.astype(np.float32)
