"""The high-water mark of CPU memory allocated while a function runs, from the profiler.

PyTorch's CPU allocator keeps no peak counter (CUDA's does), so the profiler's memory events are
replayed in time order. The precise source is the raw event list, which is not public API
(`profile.profiler.kineto_results`): it sees allocations freed inside an op, too. It is checked
once per process against a known allocation pattern; if it is missing, changed or wrong, one
warning is logged and the public `profile.events()` is used instead, whose top-level events give
the same curve at op granularity (transients inside one op are then not seen).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

_CHECK_BYTES = 1 << 20  # the check allocates two blocks of this size, then frees both
_raw_events_ok: bool | None = None  # None until checked


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """The CPU profiler's C++ side prints a line as it starts and as it stops (torch 2.13; no
    setting turns it off): keep them off the user's terminal, and nothing else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled(fn: Callable[[], object]) -> profile:
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with native_stderr_silenced():
        prof.start()
    try:
        fn()
    finally:
        with native_stderr_silenced():
            prof.stop()
    return prof


def _replay(deltas: list[tuple[int, int]]) -> int:
    """Peak of the running sum of (time, bytes) allocation (+) and free (-) events."""
    current = peak = 0
    for _, nbytes in sorted(deltas):
        current += nbytes
        peak = max(peak, current)
    return peak


def _peak_raw(prof: profile) -> int:
    events = prof.profiler.kineto_results.events()
    cpu = torch.autograd.DeviceType.CPU
    return _replay(
        [
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == cpu
        ]
    )


def _peak_public(prof: profile) -> int:
    tops = [e for e in prof.events() if e.cpu_parent is None]
    return _replay([(e.time_range.start, e.cpu_memory_usage) for e in tops])


def _two_blocks() -> None:
    n = _CHECK_BYTES // 4
    a = torch.ones(n)
    b = torch.ones(n)
    del a, b


def raw_events_usable() -> bool:
    """Whether the raw event list gives the right peak in this torch (checked once)."""
    global _raw_events_ok
    if _raw_events_ok is None:
        try:
            peak = _peak_raw(_profiled(_two_blocks))
            _raw_events_ok = 2 * _CHECK_BYTES <= peak <= 2 * _CHECK_BYTES + (64 << 10)
            problem = f"it measured {peak} bytes for {2 * _CHECK_BYTES}"
        except Exception as err:
            _raw_events_ok, problem = False, f"{type(err).__name__}: {err}"
        if not _raw_events_ok:
            log.warning(
                "the profiler's raw memory events are not usable in torch %s (%s); CPU peak "
                "memory is read from its public events instead (op granularity)",
                torch.__version__,
                problem,
            )
    return _raw_events_ok


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes allocated at the high-water mark while fn runs, above what was allocated before."""
    use_raw = raw_events_usable()
    prof = _profiled(fn)
    return _peak_raw(prof) if use_raw else _peak_public(prof)
