"""prepare(cfg) checks everything that can fail cheaply; fit(job) trains and writes summary.json.

The split lets the command line refuse bad input (a missing corpus, a foreign checkpoint, a run
directory that holds another run) before anything is written. `fit` is a straight line of named
steps: build the module, the trainer and the streams, plan the chunks, run, write the summary.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch.distributed
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from seqtrain import cells, rundir, threads, trainer_extras
from seqtrain.callbacks import (
    BestCheckpoint,
    FinalValidation,
    FollowLoad,
    Preemption,
    ProgressLines,
    StepProgressBar,
    TextSamples,
    Throughput,
)
from seqtrain.checkpoint import (
    AtomicCheckpointIO,
    check_resumable,
    newest_complete,
    read,
    spec_of,
)
from seqtrain.config import Config, TrainerConfig, to_dict
from seqtrain.data import Corpus, DataSpec, Streams, eval_loader, load_splits, train_loader
from seqtrain.errors import CheckpointError, ConfigError, SeqtrainError, first_line
from seqtrain.machine import (
    check_machine,
    check_model_fits,
    in_multirun,
    local_processes,
    ranks_started_elsewhere,
)
from seqtrain.memory import cache_host_memory, plan_memory
from seqtrain.module import MIB, SequenceModule, host_rss_bytes
from seqtrain.tasks import build_task

log = logging.getLogger("seqtrain")
FILE_KEYS = ("path", "doc_starts_path", "tokenizer_file")  # data.* files kept as absolute paths


def quiet_lightning() -> None:
    """One log line per event: Hydra's handler prints, Lightning's own banner and tips do not."""
    logging.getLogger("lightning.pytorch").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Checkpoints are written after an update completes, which is what exact resume needs.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # prepare() refuses a run directory with checkpoints unless resuming from them.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


# The columns every run's HParams row has (model size, backend, window, rate); hparams() adds the
# keys the command line set or swept.
HPARAMS = (
    "model.cell",
    "model.backend",
    "model.num_layers",
    "model.hidden_size",
    "tbptt.window",
    "optim.lr",
)


def hparams(cfg: Config) -> dict:
    """The HParams row: HPARAMS, then every key the command line set (a sweep's included) and
    every config group it chose (+experiment=char_lm -> experiment: char_lm).

    All ~60 keys would bury what differs between runs under columns that never change.
    """
    flat = flatten(to_dict(cfg))
    row = {key: flat[key] for key in HPARAMS}
    for override in command_line_overrides():
        key, _, value = override.lstrip("+~").partition("=")
        prefix = f"{key}."
        matched = {k: v for k, v in flat.items() if k == key or k.startswith(prefix)}
        row.update(matched or {key: value})  # a group choice, or a dict node's keys
    return row


def command_line_overrides() -> list[str]:
    """The run's key=value overrides under Hydra (a multirun job's own values); none outside."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
    splits: dict[str, Corpus]  # each tokenized, with its targets (data.load_splits)
    spec: DataSpec  # what the model and task need to know about the data, the tokenizer included
    resume_from: Path | None
    start_window: int  # the data cursor to continue from (0 for a fresh run)
    finished: bool = False  # resumed at trainer.max_steps with summary.json: nothing to do
    prompt: bytes = b""  # the start of the val split's text, where text samples begin
    val_streams: int = 1  # per rank: data.eval_batch_size, or fewer where val is short


def holds_run(run_dir: Path) -> bool:
    """Checkpoints or a summary: the folder holds a run that a fresh start would overwrite."""
    return (run_dir / "summary.json").exists() or any((run_dir / "checkpoints").glob("*.ckpt"))


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None; no way of starting overwrites another run."""
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path).expanduser()
        own = (run_dir / "checkpoints").resolve()
        if holds_run(run_dir) and path.resolve().parent != own:
            raise CheckpointError(
                f"{run_dir} already holds another run; resume from ckpt_path into a new "
                "hydra.run.dir, or pass resume=auto to continue the run there"
            )
        return path
    if cfg.resume == "auto":
        found = newest_complete(run_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s; starting fresh", run_dir)
        return found
    if cfg.resume == "fresh":
        if holds_run(run_dir):
            log.warning("resume=fresh: starting %s over from step 0, replacing its run", run_dir)
        return None
    if holds_run(run_dir):
        raise CheckpointError(
            f"{run_dir} already holds checkpoints; pass resume=auto to continue that run, "
            "or choose another hydra.run.dir"
        )
    return None


def prepare(cfg: Config, run_dir: Path) -> Job:
    """Load and check the machine, the data, the task and the resume checkpoint; writes
    nothing."""
    check_machine(cfg)
    for key in FILE_KEYS:  # checkpoints keep the files themselves: evaluate reads them anywhere
        if getattr(cfg.data, key) is not None:
            setattr(cfg.data, key, str(Path(getattr(cfg.data, key)).expanduser().resolve()))
    resume_from = resume_point(cfg, run_dir)
    world = cfg.trainer.devices * cfg.trainer.num_nodes  # ranks, each with its own streams
    ckpt = None if resume_from is None else read(resume_from)  # before the corpus: cheap first
    if ckpt is not None:
        ranks = len(ckpt.get("seqtrain", {}).get("ranks", [None]))
        if ranks != world:  # first: a world size also changes data.batch_size per rank
            raise CheckpointError(
                f"ckpt={resume_from} holds the streams and state of {ranks} rank(s); resume "
                f"with trainer.devices x trainer.num_nodes = {ranks} (this run has {world})"
            )
        check_max_steps(ckpt, cfg, resume_from)
    streams = {"train": cfg.data.batch_size * world, "val": cfg.data.eval_batch_size * world}
    saved = None if ckpt is None else spec_of(ckpt)  # resume: the run's own tokenizer, not refit
    data = load_splits(cfg.data, streams, cfg.tbptt.window, saved, world=world)
    splits, spec = data.parts, data.spec
    if spec.kind == "tokens" and not spec.text and cfg.trainer.sample_length:
        # Token ids read from an array: no tokenizer turns them into text. Samples the command
        # line asked for are refused; the default's are left out, said once.
        source = f"data.path={cfg.data.path}" if cfg.data.path else f"data.source={cfg.data.source}"
        if cfg.trainer.sample_length != TrainerConfig.sample_length:
            raise ConfigError(
                f"trainer.sample_length={cfg.trainer.sample_length}: {source} holds token ids "
                "and no tokenizer to write samples as text; set trainer.sample_length=0"
            )
        log.info(
            "%s holds token ids that no tokenizer of the run writes as text: no text samples "
            "(trainer.sample_length=0)",
            source,
        )
        cfg.trainer.sample_length = 0
    task = build_task(cfg.task, spec)
    task.check_model(cfg.model)  # what needs the data: lm's cutoffs against the vocabulary
    check_model_fits(cfg, task)
    if cfg.trainer.sample_length and not task.generates_text:
        raise ConfigError(
            f"trainer.sample_length={cfg.trainer.sample_length}: task.name={cfg.task.name} "
            "generates no text; set trainer.sample_length=0"
        )
    start_window, finished = 0, False
    if ckpt is not None:
        check_resumable(ckpt, cfg, spec, resume_from)
        start_window = ckpt["seqtrain"]["windows"]
        finished = (
            ckpt["global_step"] == cfg.trainer.max_steps and (run_dir / "summary.json").is_file()
        )
    return Job(
        cfg,
        run_dir,
        splits,
        spec,
        resume_from,
        start_window,
        finished,
        data.prompt,
        data.streams["val"] // world,
    )


def check_max_steps(ckpt: dict, cfg: Config, resume_from: Path) -> None:
    """A checkpoint past trainer.max_steps: Lightning would train nothing and the summary would
    present the checkpoint as a run of trainer.max_steps updates."""
    step = ckpt.get("global_step", 0)
    if step > cfg.trainer.max_steps:
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps}: below the step of ckpt={resume_from} "
            f"({step}); raise trainer.max_steps to train on, or measure it with "
            f"python -m seqtrain.evaluate ckpt={resume_from}"
        )


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
        raise SeqtrainError(f"the job's own process failed (exit code {code}); see its log")
    return json.loads((job.run_dir / "summary.json").read_text())


@dataclass
class Parts:
    """The Trainer and the callbacks whose figures go into the summary."""

    trainer: L.Trainer
    throughput: Throughput
    best: BestCheckpoint
    preemption: Preemption


def build_module(job: Job) -> SequenceModule:
    """The task's model and the engine, weights drawn from the run's seed."""
    L.seed_everything(job.cfg.seed, workers=True, verbose=False)
    return SequenceModule.from_config(job.cfg, job.spec)


def build_trainer(
    job: Job,
    module: SequenceModule,
    preemption: Preemption,
    governor: threads.Governor | None = None,
) -> Parts:
    """Lightning's Trainer with seqtrain's checkpoints, logger and callbacks; `governor` sets
    the thread count between updates (trainer.threads=auto)."""
    cfg, run_dir = job.cfg, job.run_dir
    throughput = Throughput()
    best = BestCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=f"val/{module.task.monitor}",  # the task's primary figure (val/bpc for lm)
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
    loggers = trainer_extras.build_loggers(cfg.logger, run_dir, job.start_window)  # logger=...
    progress = cfg.trainer.progress_bar
    show_progress = sys.stderr.isatty() if progress is None else progress  # the bar's stream
    lines = (cfg.trainer.progress_every, cfg.trainer.progress_seconds)
    prompt = job.prompt  # read only by tasks that generate text
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg.trainer),
        precision=cfg.trainer.precision,
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None,  # count validation intervals in updates, across epochs
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=loggers,
        callbacks=[
            throughput,
            FinalValidation(),
            best,
            last,
            TextSamples(prompt, cfg.trainer.sample_length),
            preemption,
            *([FollowLoad(governor)] if governor is not None else []),
            *([StepProgressBar()] if show_progress else []),
            # Lines in cli.log also beside the bar; on stdout too when it is not the terminal.
            ProgressLines(*lines, file_only=show_progress and sys.stdout.isatty()),
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
    return Parts(trainer, throughput, best, preemption)


def build_strategy(tr: TrainerConfig) -> str | DDPStrategy:
    """DDP with seqtrain's wait limit when there are several ranks (auto picks DDP then too)."""
    if tr.devices * tr.num_nodes == 1:
        return tr.strategy
    return DDPStrategy(timeout=timedelta(seconds=tr.ddp_timeout))


def build_streams(job: Job, trainer: L.Trainer) -> tuple[Streams, Streams]:
    """This rank's training and validation streams.

    The rank is known once the Trainer exists (ddp children and SLURM tasks read it from the
    environment): each process builds only its own contiguous block of the streams.
    """
    cfg, rank, world = job.cfg, trainer.global_rank, trainer.world_size
    stride = cfg.tbptt.stride or cfg.tbptt.window
    train = Streams(job.splits["train"], cfg.data.batch_size, stride, rank, world)
    val = Streams(job.splits["val"], job.val_streams, cfg.tbptt.window, rank, world)
    return train, val


def plan_chunks(job: Job, module: SequenceModule, trainer: L.Trainer) -> None:
    """Choose the checkpoint chunk (memory.budget) by measuring updates on the training device
    under the run's precision, before training; the engine runs the plan. A budget that cannot
    be met is one line."""
    cfg, device = job.cfg, trainer.strategy.root_device
    module.to(device)
    autocast = None
    if cfg.trainer.precision == "bf16-mixed":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    try:
        plan = plan_memory(cfg.memory, module.engine, cfg.data.batch_size, autocast)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    module.engine.chunk = plan.chunk
    module.memory_plan = plan.as_dict()


def log_start(job: Job, module: SequenceModule, trainer: L.Trainer) -> None:
    cfg = job.cfg
    log.info(
        "model: %s %s, %d x %d, %s parameters; kernel: %s; device: %s",
        cfg.model.backend,
        cfg.model.cell,
        cfg.model.num_layers,
        cfg.model.hidden_size,
        f"{sum(p.numel() for p in module.model.parameters()):,}",
        cells.kernel_name(module.model.rnn, trainer.strategy.root_device),
        trainer.strategy.root_device,
    )
    if job.resume_from is not None:
        log.info("resuming from %s at window %d", job.resume_from, job.start_window)


def run(
    job: Job, module: SequenceModule, trainer: L.Trainer, train: Streams, val: Streams
) -> float:
    """Train to trainer.max_steps (or a signal); the wall-clock seconds it took."""
    start = time.perf_counter()
    vary_seed = job.cfg.seed if job.cfg.tbptt.vary else None  # every rank draws the same lengths
    try:
        trainer.fit(
            module,
            train_loader(train, job.start_window, vary_seed),
            eval_loader(val, stop=lambda: module.stop_requested),
            ckpt_path=job.resume_from,
            weights_only=True,  # our checkpoints hold tensors and plain data only: no code runs
        )
    except RuntimeError as err:  # a peer that died mid-collective, or never came
        if peer_lost(err):
            raise SeqtrainError(
                f"DDP: another rank stopped during training ({first_line(err)}); its own output "
                "says why; resume with resume=auto once it is fixed"
            ) from None
        if not isinstance(err, torch.distributed.DistError):
            raise
        raise SeqtrainError(
            f"DDP: the ranks did not all answer within trainer.ddp_timeout="
            f"{job.cfg.trainer.ddp_timeout:g} s ({first_line(err)}); start every rank (SLURM: one "
            "task per device), or check MASTER_ADDR and MASTER_PORT"
        ) from None
    return time.perf_counter() - start


# What only updates measure: a process that ran none has none of these figures of its own.
UPDATE_FIGURES = ("train_seconds", "tokens_per_s", "saved_bytes", "peak_bytes")


def measured_earlier(job: Job, step: int) -> dict:
    """The update figures of a resume that trained nothing: those of the summary the checkpoint's
    own run wrote at the same step, or null with the reason (never the zeros of no updates)."""
    earlier = None if job.resume_from is None else job.resume_from.parent.parent / "summary.json"
    try:
        old = json.loads(earlier.read_text()) if earlier is not None else {}
    except (OSError, ValueError):
        old = {}
    if old.get("steps") == step and all(key in old for key in UPDATE_FIGURES):
        return {**{key: old[key] for key in UPDATE_FIGURES}, "figures_from": str(earlier)}
    return {
        **dict.fromkeys(UPDATE_FIGURES),
        "figures_note": f"no update ran in this process (it ended at step {step}, where it "
        "began), and no summary.json of that step holds the run's throughput and memory",
    }


def peer_lost(err: RuntimeError) -> bool:
    """gloo's and NCCL's words for a rank that died mid-collective (killed, out of memory)."""
    words = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was")
    return any(word in str(err) for word in words)


def write_summary(
    job: Job, module: SequenceModule, parts: Parts, val: Streams, wall: float
) -> dict:
    """Validate the final weights if needed, save last.ckpt, write summary.json and hparams."""
    cfg, run_dir, trainer = job.cfg, job.run_dir, parts.trainer
    summary = {
        "steps": trainer.global_step,
        "tokens": module.tokens_seen,
        "train_seconds": round(parts.throughput.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_s": round(parts.throughput.tokens_per_s, 1),
        "train_loss": module.train_loss,
        "skipped_steps": module.skipped_steps,
        "backend": cfg.model.backend,
        "cell": cfg.model.cell,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "device": str(trainer.strategy.root_device),
        "world_size": trainer.world_size,  # ranks; steps, tokens and tokens_per_s are global
        "resumed_from": None if job.resume_from is None else str(job.resume_from),
        "saved_bytes": module.saved_bytes,  # the most one update held for backward
        "peak_bytes": module.peak_bytes,  # one update's high-water mark above the weights
        "host_rss_bytes": host_rss_bytes(),  # the process's resident high-water mark
        "memory": module.memory_plan,  # the checkpointing plan, predicted vs measured
        "data_warnings": list(job.spec.warnings),  # degenerate data: the figures say little
    }
    if parts.throughput.tokens == 0:  # resumed at trainer.max_steps (or stopped before an update)
        summary.update(measured_earlier(job, trainer.global_step))
    preemption = parts.preemption
    if preemption.received is not None:
        return {
            **summary,
            "stopped_by": preemption.signal_name,
            "checkpoint": preemption.checkpoint,
        }
    if module.last_val_step != trainer.global_step:  # resumed from the final save: no update ran
        trainer.validate(module, eval_loader(val), verbose=False, weights_only=True)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    monitor = f"val/{module.task.monitor}"
    summary.update(
        # val_loss and the task's figures: val_bpc for lm; val_mse, val_nmse for regression
        {name.replace("/", "_"): value for name, value in module.last_val.items()},
        best_checkpoint=parts.best.best_model_path,
        monitor=monitor,  # the figure best.ckpt and a sweeper go by; its value is summary[...]
    )
    if trainer.is_global_zero:
        metrics = {
            monitor: module.last_val[monitor],  # the task's figure: val/bpc for lm
            # every tokenizer's common scale (lm), for HParams rows that compare tokenizers
            **{k: v for k, v in module.last_val.items() if k == "val/bits_per_byte"},
            "memory/host_rss_MiB": summary["host_rss_bytes"] / MIB,
        }
        if summary["tokens_per_s"] is not None:  # the run's, validation excluded
            metrics["perf/tokens_per_s"] = summary["tokens_per_s"]
        if summary.get("peak_bytes") is not None:
            metrics["memory/peak_MiB"] = summary["peak_bytes"] / MIB
        trainer_extras.log_final(trainer.loggers, hparams(cfg), metrics, trainer.global_step)
        rundir.write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def fit(job: Job, before_training: Callable[[], None] | None = None) -> dict:
    """Train one model; return (and write) the run summary. `before_training` runs once every
    check has passed, the memory plan included, right before the first update (the command
    line writes the `.hydra/` record there, so a run refused by a late check writes nothing)."""
    cfg = job.cfg
    if job.finished:  # resume=auto of a finished run: its results stay as they are
        log.info(
            "%s finished at trainer.max_steps=%d; summary.json is left as it was (raise "
            "trainer.max_steps to train longer)",
            job.run_dir,
            cfg.trainer.max_steps,
        )
        return json.loads((job.run_dir / "summary.json").read_text())
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if world > 1 and in_multirun() and not ranks_started_elsewhere():
        return fit_in_own_process(job)
    quiet_lightning()
    _, governor = threads.configure(cfg.trainer.threads, local_processes(cfg))
    if cfg.memory.host_cache and cache_host_memory():
        log.info("host memory cache: freed CPU memory stays in the process (memory.host_cache)")
    preemption = Preemption(job.run_dir / "checkpoints" / "last.ckpt")  # handlers before work
    try:
        module = build_module(job)
        parts = build_trainer(job, module, preemption, governor)
        train, val = build_streams(job, parts.trainer)
        if parts.trainer.world_size > 1:
            # The weights are already built (DDP copies rank 0's to every rank anyway); from
            # here on each rank draws its own dropout masks, as the streams of one process do.
            L.seed_everything(cfg.seed + parts.trainer.global_rank, workers=True, verbose=False)
        log_start(job, module, parts.trainer)
        plan_chunks(job, module, parts.trainer)
        if before_training is not None:
            before_training()
        wall = run(job, module, parts.trainer, train, val)
    finally:
        preemption.teardown(None, None, "fit")  # also when a step failed before Lightning ran
    return write_summary(job, module, parts, val, wall)
