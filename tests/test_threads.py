"""trainer.threads: the intra-op thread count and an OpenMP wait policy that yields its core."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from seqtrain import machine, threads
from seqtrain.config import validate
from seqtrain.errors import ConfigError

from .conftest import ENV, seqtrain
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


def test_a_run_says_its_threads_and_openmp_does_not_spin(tmp_path: Path) -> None:
    """The wait policy must be in the environment before torch loads GNU OpenMP, which reads it
    once: OMP_DISPLAY_ENV=verbose has OpenMP print what it took (a spin count of 0 is
    PASSIVE; its default spins 300000 times)."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="verbose", OMP_NUM_THREADS="1")
    done = seqtrain("+debug=tiny", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cpus = threads.usable_cpus()
    line = f"threads: 1 of {cpus} CPUs (OMP_NUM_THREADS=1), OMP wait policy passive"
    assert line in done.stdout
    assert line in (tmp_path / "cli.log").read_text()
    if "GOMP_SPINCOUNT" in done.stderr:  # GNU OpenMP (Linux wheels); other runtimes differ
        assert "GOMP_SPINCOUNT = '0'" in done.stderr
