"""CPU threads: how many intra-op threads this process takes, and how that follows other work.

On a machine other work shares (a laptop, a shared server, a CI runner, a local parallel sweep),
torch's default of one thread per core loses most of its speed: every parallel region waits for
the thread the kernel descheduled to run the other process. Sleeping instead of spinning while
waiting (OMP_WAIT_POLICY=PASSIVE) does not cure that, and on a quiet machine it costs a third of
the speed, because each of the many small regions of an update then wakes its workers from
sleep (docs/performance.md has both measured). What helps is fewer threads than busy CPUs.

So `trainer.threads=auto` takes the CPUs this process may use, shares them among the processes
of this host that train at once (sweep jobs, ranks), leaves OpenMP's wait policy as it is, and
while training follows the load: `CpuShare` measures how many of those CPUs other processes keep
busy and `Governor` sets the thread count to the CPUs they leave free. No torch import here at
module level (seqtrain/__main__.py and the tab completion import this module cheaply).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("seqtrain")

STAT = Path("/proc/stat")  # Linux: per-CPU busy and idle time since boot, in clock ticks


def affinity() -> set[int]:
    """The CPUs this process may run on (taskset, cgroups' cpusets, SLURM's allocation)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity; all cores
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    return len(affinity())


def parse(key: str | int) -> int | None:
    """trainer.threads as a count, or None for auto; ValueError names the valid values."""
    if str(key) == "auto":
        return None
    text = str(key).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"trainer.threads={key}: choose auto or a positive integer")
    return int(text)


def choose(cpus: int, processes: int, key: str | int) -> int:
    """Intra-op threads: the key's count, or (auto) this process's share of the usable CPUs
    among the `processes` that train on this host at once (sweep jobs, ranks); at least 1."""
    count = parse(key)
    if count is not None:
        return count
    return max(1, cpus // max(1, processes))


class CpuShare:
    """How many of this process's CPUs other processes kept busy since the previous reading.

    /proc/stat's per-CPU counters, summed over the CPUs this process may use (others' work on
    CPUs it cannot use does not matter), give those CPUs' busy time; this process's own CPU time
    (all its threads) is subtracted. What remains is other processes' work, steal time included
    (a hypervisor's other guests take the CPU as surely). None where there is no /proc/stat.
    """

    def __init__(
        self,
        cpus: set[int] | None = None,
        stat: Path = STAT,
        wall: Callable[[], float] = time.monotonic,
        own: Callable[[], float] = time.process_time,
    ) -> None:
        self.cpus = affinity() if cpus is None else cpus
        self.stat, self.wall, self.own = stat, wall, own
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._reading()

    def _busy_seconds(self) -> float | None:
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        busy = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            cpu = name.removeprefix("cpu")
            if not (name.startswith("cpu") and cpu.isdigit() and int(cpu) in self.cpus):
                continue
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            ticks = [int(v) for v in rest.split()[:8]]
            busy += sum(ticks) - ticks[3] - ticks[4]
        return busy / self.ticks

    def _reading(self) -> tuple[float, float, float] | None:
        busy = self._busy_seconds()
        return None if busy is None else (self.wall(), busy, self.own())

    def others(self) -> float | None:
        """CPUs' worth of other processes' work since the previous call (or since creation)."""
        now = self._reading()
        if now is None or self.last is None:
            return None
        (wall0, busy0, own0), (wall1, busy1, own1) = self.last, now
        self.last = now
        if wall1 <= wall0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))

    def seconds_since_reading(self) -> float:
        return math.inf if self.last is None else self.wall() - self.last[0]


class Governor:
    """trainer.threads=auto while training: as many threads as CPUs other processes leave free.

    At most `most` (auto's share), at least 1. A change needs two readings in a row that agree
    (about INTERVAL seconds apart), so one burst of someone else's work does not move it; the
    first reading, which covers the whole start-up, decides alone. Each change is one log line.
    """

    INTERVAL = 2.0  # seconds between readings: long enough for /proc/stat's 10 ms ticks

    def __init__(self, most: int, share: CpuShare, set_threads: Callable[[int], None]) -> None:
        self.most, self.share, self.set_threads = most, share, set_threads
        self.current = most
        self.readings = 0
        self.proposed: int | None = None

    def wanted(self, others: float) -> int:
        """The CPUs others leave free, rounded, within [1, most]."""
        free = len(self.share.cpus) - others
        return max(1, min(self.most, math.floor(free + 0.5)))

    def tick(self) -> int | None:
        """Call between updates: the new thread count when it changes, else None."""
        if self.readings and self.share.seconds_since_reading() < self.INTERVAL:
            return None
        others = self.share.others()
        self.readings += 1
        if others is None:
            return None
        wanted = self.wanted(others)
        agreed = self.readings == 1 or wanted == self.proposed
        self.proposed = wanted
        if wanted == self.current or not agreed:
            return None
        self.current = wanted
        self.set_threads(wanted)
        log.info(
            "threads: %d of %d CPUs (other processes keep %.1f busy; trainer.threads=auto)",
            wanted,
            len(self.share.cpus),
            others,
        )
        return wanted


def configure(key: str | int, processes: int = 1) -> tuple[str, Governor | None]:
    """Set torch's intra-op thread count from trainer.threads; log and return what was chosen,
    and the Governor that follows the load while training (auto alone; None otherwise).

    An OMP_NUM_THREADS in the environment is the user's own choice: auto keeps it, and so does
    an explicit count: only auto's own choice follows the load.
    """
    import torch

    cpus = usable_cpus()
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    auto = parse(key) is None
    governor = None
    if auto and given.isdigit() and int(given) > 0:
        count, why = int(given), f" (OMP_NUM_THREADS={given})"
    else:
        count = choose(cpus, processes, key)
        why = f" ({processes} processes share them)" if auto and processes > 1 else ""
        if auto:
            governor = Governor(count, CpuShare(), torch.set_num_threads)
            why += "; fewer while other processes keep CPUs busy"
    torch.set_num_threads(count)
    line = f"threads: {count} of {cpus} CPUs{why}"
    log.info(line)
    return line, governor
