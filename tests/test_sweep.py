"""Hydra sweeps through the real command line: grids, jobs on 2 devices, Optuna, submitit."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seqtrain import report

from .conftest import seqtrain
from .test_cli import ENV

pytestmark = pytest.mark.slow

# Smaller than +debug=tiny alone: one validation over a 1 KB val split per job.
TINY = [
    "+debug=tiny",
    "data.max_bytes=20000",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.accelerator=cpu",
    "trainer.sample_length=0",
]
ENV = {**ENV, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
TWO_DEVICES = ["trainer.devices=2", "data.batch_size=2", "data.eval_batch_size=2"]


def sweep(sweep_dir: Path, *args: str, python: str = sys.executable) -> list[Path]:
    """Run `python -m seqtrain -m ...`; return the job directories, in job order."""
    done = subprocess.run(
        [python, "-m", "seqtrain", "-m", *TINY, f"hydra.sweep.dir={sweep_dir}", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def overrides(job: Path) -> list[str]:
    return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())


def summary(job: Path) -> dict:
    return json.loads((job / "summary.json").read_text())


def test_grid_sweep_runs_every_combination_and_reports(tmp_path: Path) -> None:
    root = tmp_path / "grid"
    jobs = sweep(root, "model.backend=cudnn,modular", "memory=chunk", "memory.chunk=4,8")
    assert len(jobs) == 4
    combos = {
        (summary(j)["backend"], next(o for o in overrides(j) if o.startswith("memory.chunk")))
        for j in jobs
    }
    assert combos == {(b, f"memory.chunk={c}") for b in ("cudnn", "modular") for c in (4, 8)}
    assert all(summary(j)["steps"] == 4 for j in jobs)

    assert report.main([str(root)]) == 0
    table = (root / "report.md").read_text()
    assert "| job | memory.chunk | model.backend | val bpc |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 4
    assert (root / "report_speed.png").is_file() and (root / "report.csv").is_file()


def test_multirun_jobs_on_two_devices(tmp_path: Path) -> None:
    """Lightning's ddp re-runs the command line for rank 1; under -m that would be the sweep."""
    root = tmp_path / "ddp"
    jobs = sweep(root, *TWO_DEVICES, "model.backend=cudnn,modular")
    assert [j.name for j in jobs] == ["0", "1"]  # no nested sweeps started by the ranks
    for job, backend in zip(jobs, ("cudnn", "modular"), strict=True):
        s = summary(job)
        assert s["backend"] == backend and s["world_size"] == 2
        assert s["steps"] == 4 and s["tokens"] == 4 * 2 * 2 * 16  # global: 2 ranks x 2 streams
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert f"model.backend={backend}" in overrides(job)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (hydra_plugins) is missing
        return False


def needs(module: str):
    return pytest.mark.skipif(not installed(module), reason=f"{module}: optional extra")


@needs("hydra_plugins.hydra_optuna_sweeper")
def test_optuna_search_minimises_val_bpc(tmp_path: Path) -> None:
    root = tmp_path / "optuna"
    done = seqtrain(
        *TINY,
        "+hparams_search=char_lm_optuna",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={root}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [root / "0", root / "1"]
    assert all(any(o.startswith("optim.lr=") for o in overrides(j)) for j in jobs)
    best = yaml.safe_load((root / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(min(summary(j)["val_bpc"] for j in jobs))


@needs("hydra_plugins.hydra_submitit_launcher")
def test_submitit_local_launcher_runs_a_two_device_job(tmp_path: Path) -> None:
    root = tmp_path / "submitit"
    (job,) = sweep(root, "hydra/launcher=local", *TWO_DEVICES)
    assert summary(job)["world_size"] == 2


@needs("hydra_plugins.hydra_submitit_launcher")
def test_a_failing_job_under_submitit_counts_in_the_exit_status(tmp_path: Path) -> None:
    """submitit runs each job in its own process: the failure reaches the sweep's status through
    the job folder's error.txt (cli.SweepFailures), and the other job still trains."""
    root = tmp_path / "submitit"
    done = subprocess.run(
        [sys.executable, "-m", "seqtrain", "-m", *TINY, f"hydra.sweep.dir={root}"]
        + ["hydra/launcher=local", "tbptt.window=16,100000"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 sweep job(s) failed" in done.stderr
    assert (root / "0" / "summary.json").is_file()
    assert "tbptt.window 100000" in (root / "1" / "error.txt").read_text()
