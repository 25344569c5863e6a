"""What this machine can run, checked before anything is written: devices, the ranks' launch
environment, memory for the model's weights; and how many processes of a run share its CPUs.

Lightning would raise a missing device after the corpus loaded, in many lines, wait forever for
ranks that never come, or let the allocator fail; each is one line here instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from seqtrain import cells, threads
from seqtrain.config import Config
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.tasks import Task, build_model


def check_machine(cfg: Config) -> None:
    """What this machine cannot run, in one line before anything is written (Lightning would
    raise it after the corpus loaded, in many lines, or wait forever for absent nodes)."""
    import torch

    tr = cfg.trainer
    if tr.accelerator in ("gpu", "cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"trainer.accelerator={tr.accelerator}: this machine has no CUDA GPU; use "
                "trainer.accelerator=cpu or auto"
            )
        if tr.devices > count:
            raise ConfigError(
                f"trainer.devices={tr.devices}: this machine has {count} GPU(s); choose 1..{count}"
            )
        if tr.precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision=bf16-mixed: this GPU has no bfloat16; use 32-true")
    if tr.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: this machine has no MPS device; use cpu")
    try:
        cells.check_runnable(cfg.model.backend, cfg.model.cell, run_device(cfg))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_rank_environment()
    if tr.num_nodes > 1 and not ranks_started_elsewhere():
        raise ConfigError(
            f"trainer.num_nodes={tr.num_nodes}: no cluster launcher started the other nodes "
            "(SLURM or torchrun); start the run through one (docs/scaleout.md) or use "
            "trainer.num_nodes=1"
        )


# What a launcher that starts the ranks itself sets beside LOCAL_RANK (Lightning's ddp children
# and any hand-made launch need all of them; SLURM and torchrun are detected on their own).
RANK_VARIABLES = ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_rank_environment() -> None:
    """LOCAL_RANK alone (a leftover of another launcher in the shell) makes Lightning take this
    process for one rank of a started job and wait trainer.ddp_timeout for the others, silently."""
    if "LOCAL_RANK" not in os.environ or SLURMEnvironment.detect():
        return
    if TorchElasticEnvironment.detect():
        return
    missing = [name for name in RANK_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"LOCAL_RANK={os.environ['LOCAL_RANK']} is set in the environment but "
            f"{', '.join(missing)} not: a leftover of another launcher? unset LOCAL_RANK "
            "(seqtrain starts the ranks of trainer.devices itself)"
        )


def run_device(cfg: Config) -> str:
    """The device type the run trains on, as Lightning will choose it."""
    import torch

    tr = cfg.trainer
    if tr.accelerator in ("gpu", "cuda") or (
        tr.accelerator == "auto" and torch.cuda.is_available()
    ):
        return "cuda"
    if tr.accelerator == "mps" or (tr.accelerator == "auto" and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def available_memory(cfg: Config) -> tuple[int, str] | None:
    """Bytes the run's weights can live in and where that figure comes from: the GPU's memory
    when training on CUDA, else the host's MemAvailable; None when it cannot be known."""
    import torch

    if run_device(cfg) == "cuda":
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"  # no context
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free memory"
    except (OSError, ValueError, AttributeError):
        return None


def check_model_fits(cfg: Config, task: Task) -> None:
    """A model whose weights and gradients alone exceed the memory there is would fail in the
    allocator after the corpus loaded (or swap the machine to a halt): one line before that. The
    model is built on the meta device, which allocates nothing; a user's cell is probed there
    (shapes only), and what it refuses is refused here, before anything is written."""
    import torch

    try:
        with torch.device("meta"):
            model = build_model(cfg.model, task)
    except SeqtrainError:
        raise
    except Exception:  # what needs values (a plug-in's .item()): the real build will tell
        return
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    available = available_memory(cfg)
    if available is None or 2 * weights <= available[0]:
        return
    m = cfg.model
    raise ConfigError(
        f"model.hidden_size={m.hidden_size}, model.num_layers={m.num_layers}: "
        f"{weights / 1e9:,.1f} GB of weights, and training needs at least twice that (weights "
        f"and gradients); this machine has {available[0] / 1e9:,.1f} GB ({available[1]}); "
        "lower model.hidden_size or model.num_layers"
    )


def ranks_started_elsewhere() -> bool:
    """SLURM tasks, torchrun, or Lightning's own ddp children: every rank's process exists."""
    return (
        SLURMEnvironment.detect() or TorchElasticEnvironment.detect() or "LOCAL_RANK" in os.environ
    )


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def local_processes(cfg: Config) -> int:
    """The processes of this run that train on this host at once, sharing its CPUs: the ranks
    on this node (trainer.devices), times the jobs a local parallel sweep runs side by side
    (Hydra's joblib launcher, hydra.launcher.n_jobs; negative counts from the CPUs as joblib
    does: -1 is all of them)."""
    jobs = 1
    if in_multirun():
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
        if "joblib" in str(launcher.get("_target_", "")).lower():
            n_jobs = int(launcher.get("n_jobs") or 1)
            jobs = n_jobs if n_jobs > 0 else max(1, threads.usable_cpus() + 1 + n_jobs)
    return cfg.trainer.devices * jobs
