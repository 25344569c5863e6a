"""prepare(cfg) checks everything that can fail cheaply; fit(job) trains and writes summary.json.

The split lets the command line refuse bad input (a missing corpus, a foreign checkpoint, a run
directory that holds another run) before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from seqtrain import cells, trainer_extras
from seqtrain.callbacks import Preemption, StepProgressBar, TextSamples, Throughput
from seqtrain.checkpoint import AtomicCheckpointIO, check_resumable, newest_complete, read
from seqtrain.config import Config, to_dict
from seqtrain.data import (
    VOCAB_SIZE,
    Corpus,
    Streams,
    eval_loader,
    load_corpus,
    require_tokens,
    split_corpus,
    train_loader,
)
from seqtrain.errors import CheckpointError
from seqtrain.memory import cache_host_memory, plan_run
from seqtrain.module import LanguageModelModule

log = logging.getLogger("seqtrain")


def quiet_lightning() -> None:
    """One log line per event: Hydra's handler prints, Lightning's own banner and tips do not."""
    logging.getLogger("lightning.pytorch").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Checkpoints are written after an update completes, which is what exact resume needs.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # prepare() refuses a run directory with checkpoints unless resuming from them.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, with non-scalars as strings (TensorBoard's hparams)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


@dataclass
class Job:
    """A checked run: config, run directory, data splits and where to resume from."""

    cfg: Config
    run_dir: Path
    splits: dict[str, Corpus]
    resume_from: Path | None
    start_window: int  # the data cursor to continue from (0 for a fresh run)


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None; a fresh run never overwrites an old one."""
    if cfg.ckpt_path is not None:
        return Path(cfg.ckpt_path).expanduser()
    if cfg.resume == "auto":
        found = newest_complete(run_dir)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s; starting fresh", run_dir)
        return found
    if list((run_dir / "checkpoints").glob("*.ckpt")):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
            "or choose another hydra.run.dir"
        )
    return None


def prepare(cfg: Config, run_dir: Path) -> Job:
    """Load and check the data and the resume checkpoint; writes nothing."""
    resume_from = resume_point(cfg, run_dir)
    start_window = 0
    world = cfg.trainer.devices * cfg.trainer.num_nodes  # ranks, each with its own streams
    if resume_from is not None:
        ckpt = read(resume_from)
        check_resumable(ckpt, cfg, resume_from)
        start_window = ckpt["seqtrain"]["windows"]
        ranks = len(ckpt["seqtrain"].get("ranks", [None]))
        if ranks != world:
            raise CheckpointError(
                f"ckpt={resume_from} holds the streams and state of {ranks} rank(s); resume "
                f"with trainer.devices x trainer.num_nodes = {ranks} (this run has {world})"
            )
    corpus = load_corpus(cfg.data)
    splits = split_corpus(corpus, cfg.data.split)
    streams = {"train": cfg.data.batch_size * world, "val": cfg.data.eval_batch_size * world}
    require_tokens(splits, streams, cfg.tbptt.window)
    log.info(
        "corpus %s: %s bytes, %s documents; train/val/test %s",
        corpus.name,
        f"{len(corpus.tokens):,}",
        f"{len(corpus.doc_starts):,}",
        "/".join(f"{len(s.tokens):,}" for s in splits.values()),
    )
    return Job(cfg, run_dir, splits, resume_from, start_window)


def ranks_started_elsewhere() -> bool:
    """SLURM tasks, torchrun, or Lightning's own ddp children: every rank's process exists."""
    return (
        SLURMEnvironment.detect() or TorchElasticEnvironment.detect() or "LOCAL_RANK" in os.environ
    )


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def fit_in_own_process(job: Job) -> dict:
    """Run one multirun job as `python -m seqtrain <its overrides> hydra.run.dir=<its dir>`.

    Lightning's ddp starts ranks 1.. by re-running the command line, and under Hydra multirun
    that command line is the whole sweep. In a plain run of the job's own overrides it is the
    job, as in any single run; this process waits, forwarding signals, and returns the summary.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    command = [
        sys.executable,
        "-m",
        "seqtrain",
        f"--config-name={hydra_cfg.job.config_name}",
        *hydra_cfg.overrides.task,
        f'hydra.run.dir="{job.run_dir}"',
        "hydra.mode=RUN",  # a search config may set MULTIRUN: the job itself is one run
        "hydra.output_subdir=null",
    ]
    log.info("multirun job on %d devices: running it as %s", job.cfg.trainer.devices, command)
    child = subprocess.Popen(command, cwd=get_original_cwd())
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # the child saves and stops
    previous = {sig: signal.signal(sig, lambda sig, _: child.send_signal(sig)) for sig in forwarded}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code >= 128:  # stopped by a signal (its checkpoint is saved): stop the sweep as well
        sys.exit(code)
    if code != 0:
        raise RuntimeError(f"multirun job {job.run_dir} failed (exit code {code})")
    return json.loads((job.run_dir / "summary.json").read_text())


def fit(job: Job) -> dict:
    """Train one model; return (and write) the run summary."""
    cfg, run_dir = job.cfg, job.run_dir
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if world > 1 and in_multirun() and not ranks_started_elsewhere():
        return fit_in_own_process(job)
    quiet_lightning()
    if cfg.memory.host_cache and cache_host_memory():
        log.info("host memory cache: freed CPU memory stays in the process (memory.host_cache)")
    preemption = Preemption(run_dir / "checkpoints" / "last.ckpt")  # handlers before any work
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    module = LanguageModelModule.from_config(cfg, VOCAB_SIZE)
    params = sum(p.numel() for p in module.model.parameters())
    throughput = Throughput()
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/bpc",
        mode="min",
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.trainer.checkpoint_every,
        enable_version_counter=False,
    )
    loggers = trainer_extras.build_loggers(cfg.logger, run_dir)  # logger=... (tensorboard)
    progress = cfg.trainer.progress_bar
    show_progress = sys.stderr.isatty() if progress is None else progress
    prompt = job.splits["val"].tokens[:48].tobytes()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None,  # count validation intervals in updates, across epochs
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=loggers,
        callbacks=[
            throughput,
            best,
            last,
            TextSamples(prompt, cfg.trainer.sample_length),
            preemption,
            *([StepProgressBar()] if show_progress else []),
            *trainer_extras.build_callbacks(cfg.callbacks),  # +callbacks.NAME._target_=...
        ],
        # Under SLURM, Lightning's auto-requeue is off: submitit requeues and seqtrain's
        # Preemption owns SIGUSR1, so one party acts on each signal (docs/scaleout.md).
        plugins=[AtomicCheckpointIO()]
        + ([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []),
        use_distributed_sampler=False,  # the streams are split by rank already
        enable_progress_bar=show_progress,
        default_root_dir=run_dir,
        **{"enable_model_summary": False, **cfg.trainer.extra},  # +trainer.NAME=VALUE
    )
    # The rank is known once the Trainer exists (ddp children and SLURM tasks read it from the
    # environment): each process builds only its own contiguous block of the streams.
    rank, world = trainer.global_rank, trainer.world_size
    stride = cfg.tbptt.stride or cfg.tbptt.window
    train = Streams(job.splits["train"], cfg.data.batch_size, stride, rank, world)
    val = Streams(job.splits["val"], cfg.data.eval_batch_size, cfg.tbptt.window, rank, world)
    if world > 1:
        # The weights are already built (DDP copies rank 0's to every rank anyway); from here on
        # each rank draws its own dropout masks, as the streams of one process do.
        L.seed_everything(cfg.seed + rank, workers=True, verbose=False)
    log.info(
        "model: %s %s, %d x %d, %s parameters; kernel: %s; device: %s",
        cfg.model.backend,
        cfg.model.cell,
        cfg.model.num_layers,
        cfg.model.hidden_size,
        f"{params:,}",
        cells.kernel_name(module.model.rnn, trainer.strategy.root_device),
        trainer.strategy.root_device,
    )
    if job.resume_from is not None:
        log.info("resuming from %s at window %d", job.resume_from, job.start_window)
    # Before training: choose the checkpoint chunk (memory.budget) and measure one update.
    module.memory_plan = plan_run(module, cfg, trainer.strategy.root_device).as_dict()
    start = time.perf_counter()
    trainer.fit(
        module,
        train_loader(train, job.start_window),
        eval_loader(val),
        ckpt_path=job.resume_from,
        weights_only=True,  # our checkpoints hold tensors and plain data only: no code runs
    )
    wall = time.perf_counter() - start
    summary = {
        "steps": trainer.global_step,
        "tokens": module.tokens_seen,
        "train_seconds": round(throughput.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_s": round(throughput.tokens_per_s, 1),
        "train_loss": module.train_loss,
        "skipped_steps": module.skipped_steps,
        "backend": cfg.model.backend,
        "cell": cfg.model.cell,
        "parameters": params,
        "device": str(trainer.strategy.root_device),
        "world_size": trainer.world_size,  # ranks; steps, tokens and tokens_per_s are global
        "resumed_from": None if job.resume_from is None else str(job.resume_from),
        "saved_bytes": module.saved_bytes,  # the most one update held for backward
        "peak_bytes": module.peak_bytes,  # one update's high-water mark above the weights
        "memory": module.memory_plan,  # the checkpointing plan, predicted vs measured
    }
    if preemption.received is not None:
        return {
            **summary,
            "stopped_by": preemption.signal_name,
            "checkpoint": preemption.checkpoint,
        }
    if module.last_val_step != trainer.global_step:  # the last update was not validated yet
        trainer.validate(module, eval_loader(val), verbose=False, weights_only=True)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    summary.update(
        val_loss=module.last_val["val/loss"],
        val_bpc=module.last_val["val/bpc"],
        best_checkpoint=best.best_model_path,
    )
    if trainer.is_global_zero:
        metrics = {"hp/val_bpc": summary["val_bpc"], "hp/tokens_per_s": summary["tokens_per_s"]}
        if summary.get("peak_bytes") is not None:
            metrics["hp/peak_bytes"] = summary["peak_bytes"]
        trainer_extras.log_final(
            trainer.loggers, flatten(to_dict(cfg)), metrics, trainer.global_step
        )
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
