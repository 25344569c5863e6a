"""CPU threads: how many intra-op threads this process takes, and an OpenMP wait that yields.

On a machine other work shares (a laptop, a shared server, a CI runner, a local parallel sweep),
torch's default is one thread per core, each spinning while it waits for a peer that another
process has descheduled: measured on 2 cores beside one busy loop, 10.6k tokens/s by default,
18.5k with OMP_WAIT_POLICY=PASSIVE (docs/performance.md). So `trainer.threads=auto` takes the
CPUs this process may use, shares them among the processes of this host that train at once, and
OpenMP's workers sleep rather than spin when they wait.

GNU OpenMP (torch's on Linux) reads OMP_WAIT_POLICY once, when the library loads with `import
torch`; setting it later changes nothing. `seqtrain/__main__.py` therefore calls
`yield_when_waiting()` before anything imports torch. No torch import here at module level.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("seqtrain")

WAIT_POLICY = "PASSIVE"  # OpenMP workers sleep when they wait instead of spinning on a core


def yield_when_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment already says; call it before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cgroups' cpusets, SLURM's allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity; all cores
        return os.cpu_count() or 1


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


def configure(key: str | int, processes: int = 1) -> str:
    """Set torch's intra-op thread count from trainer.threads; log and return what was chosen.

    An OMP_NUM_THREADS in the environment is the user's own choice: auto keeps it.
    """
    import torch  # the wait policy was read when torch loaded (module docstring)

    cpus = usable_cpus()
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    auto = parse(key) is None
    if auto and given.isdigit() and int(given) > 0:
        count, why = int(given), f" (OMP_NUM_THREADS={given})"
    else:
        count = choose(cpus, processes, key)
        why = f" ({processes} processes share them)" if auto and processes > 1 else ""
    torch.set_num_threads(count)
    policy = os.environ.get("OMP_WAIT_POLICY", "OpenMP's default (spins)").lower()
    line = f"threads: {count} of {cpus} CPUs{why}, OMP wait policy {policy}"
    log.info(line)
    return line
