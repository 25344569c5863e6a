"""trainer.threads: the intra-op thread count, shared among processes and following the load."""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seqtrain import machine, threads
from seqtrain.callbacks import FollowLoad
from seqtrain.config import validate
from seqtrain.errors import ConfigError
from seqtrain.threads import CpuShare, Governor

from .conftest import ENV, run_in_process, seqtrain
from .test_config import composed


@pytest.mark.parametrize(
    ("cpus", "processes", "key", "expected"),
    [
        (2, 1, "auto", 2),  # alone: every CPU this process may use
        (8, 2, "auto", 4),  # two ranks or sweep jobs on this host: half each
        (8, 3, "auto", 2),  # shares round down: no CPU is asked to run two threads
        (2, 4, "auto", 1),  # more processes than CPUs: one thread each, never zero
        (2, 1, "3", 3),  # a count is taken as given, even above the CPUs
        (16, 4, 5, 5),  # ... and whatever the processes
    ],
)
def test_choose_shares_the_cpus_among_the_processes(cpus, processes, key, expected) -> None:
    assert threads.choose(cpus, processes, key) == expected


@pytest.mark.parametrize("key", ["0", "-2", "many", "1.5"])
def test_a_bad_thread_count_is_one_line_naming_the_key(key) -> None:
    with pytest.raises(ConfigError, match=rf"^trainer.threads={key}: choose auto or a positive"):
        validate(composed(f"trainer.threads={key}"))


def test_ranks_and_joblib_sweep_jobs_on_one_host_share_it(monkeypatch) -> None:
    cfg = validate(composed("trainer.devices=2"))
    assert machine.local_processes(cfg) == 2  # two DDP ranks, one sweep job
    launcher = OmegaConf.create(
        {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    )
    hydra = types.SimpleNamespace(launcher=launcher)
    monkeypatch.setattr(machine, "in_multirun", lambda: True)
    monkeypatch.setattr("hydra.core.hydra_config.HydraConfig.get", lambda: hydra)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    launcher.n_jobs = 3
    assert machine.local_processes(cfg) == 6  # 3 jobs side by side, 2 ranks each
    launcher.n_jobs = -1  # joblib's "all CPUs": 8 jobs
    assert machine.local_processes(validate(composed())) == 8
    launcher._target_ = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert machine.local_processes(validate(composed())) == 1  # one job at a time


def test_a_run_says_its_threads_and_leaves_openmp_waiting_as_it_is(tmp_path: Path) -> None:
    """OMP_WAIT_POLICY=PASSIVE cost a third of the quiet speed (docs/performance.md): seqtrain
    sets none, so GNU OpenMP keeps its default spin count (OMP_DISPLAY_ENV=verbose prints it)."""
    env = {k: v for k, v in ENV.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(OMP_DISPLAY_ENV="verbose", OMP_NUM_THREADS="1")
    done = seqtrain("+debug=tiny", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    line = f"threads: 1 of {threads.usable_cpus()} CPUs (OMP_NUM_THREADS=1)"
    assert line in done.stdout
    assert line in (tmp_path / "cli.log").read_text()
    if "GOMP_SPINCOUNT" in done.stderr:  # GNU OpenMP (Linux wheels); other runtimes differ
        assert "GOMP_SPINCOUNT = '0'" not in done.stderr  # 0 is PASSIVE


def write_stat(path: Path, busy: dict[int, int], idle: int = 1000) -> None:
    """A /proc/stat with `busy` user ticks on each CPU (and an aggregate line to skip)."""
    lines = [f"cpu  {sum(busy.values())} 0 0 {idle} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {ticks} 0 0 {idle} 0 0 0 0 0 0" for n, ticks in busy.items()]
    path.write_text("\n".join([*lines, "intr 1 2 3"]) + "\n")


def test_cpu_share_counts_others_work_on_this_process_cpus_only(tmp_path: Path) -> None:
    """Busy time of the CPUs this process may use, less its own CPU time, per wall second."""
    stat, clock = tmp_path / "stat", {"wall": 0.0, "own": 0.0}
    write_stat(stat, {0: 0, 1: 0, 2: 0})
    share = CpuShare({0, 1}, stat, lambda: clock["wall"], lambda: clock["own"])
    ticks = share.ticks  # per second
    # 2 s later: CPUs 0 and 1 were busy 3 s in all, 1 s of it this process; CPU 2 (not ours)
    # was busy throughout and must not count.
    write_stat(stat, {0: 2 * ticks, 1: ticks, 2: 2 * ticks})
    clock.update(wall=2.0, own=1.0)
    assert share.others() == pytest.approx(1.0)  # (3 - 1) s of others' work / 2 s
    clock.update(wall=4.0, own=5.0)  # this process alone, both CPUs: nobody else
    write_stat(stat, {0: 4 * ticks, 1: 3 * ticks, 2: 4 * ticks})
    assert share.others() == pytest.approx(0.0)
    assert CpuShare({0}, tmp_path / "missing").others() is None  # no /proc/stat: no reading


class FakeShare:
    """CpuShare's interface with the readings a test gives."""

    def __init__(self, readings: list[float], cpus: int = 4) -> None:
        self.readings, self.cpus = list(readings), set(range(cpus))

    def others(self) -> float:
        return self.readings.pop(0)

    def seconds_since_reading(self) -> float:
        return Governor.INTERVAL


def test_the_governor_takes_the_cpus_others_leave_free_after_two_readings_agree() -> None:
    set_to: list[int] = []
    governor = Governor(4, FakeShare([2.1, 2.0, 0.2, 0.4, 3.0, 0.0, 3.6, 3.9]), set_to.append)
    counts = [governor.tick() for _ in range(8)]
    # first reading (start-up) alone: 4 - 2.1 -> 2; a burst (0.2) once is not enough; twice
    # (0.2, 0.4) is: back to 4, never above auto's share; 3.0 once, not followed: kept; 3.6 and
    # 3.9: 0.4 and 0.1 free, never below 1 thread.
    assert counts == [2, None, None, 4, None, None, None, 1]
    assert set_to == [2, 4, 1]


def test_a_run_under_auto_trains_on_the_cpus_others_leave_free(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """Beside a process that keeps one of two CPUs busy, the run takes one thread."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # auto keeps a given count
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1})
    monkeypatch.setattr(CpuShare, "others", lambda self: 1.0)
    seen: list[int] = []
    monkeypatch.setattr(
        FollowLoad, "on_train_batch_end", lambda *a: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="seqtrain"):
            run_in_process(tmp_path, "+debug=tiny", "trainer.max_steps=3", "trainer.threads=auto")
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1]
    assert "threads: 2 of 2 CPUs; fewer while other processes keep CPUs busy" in caplog.text
    assert (
        "threads: 1 of 2 CPUs (other processes keep 1.0 busy; trainer.threads=auto)" in caplog.text
    )
