"""What the config adds to Lightning's Trainer: loggers, callbacks and any other Trainer argument.

seqtrain's own callbacks (throughput, checkpoints, samples, preemption, progress bar) are built in
train.py; these come on top. Trainer arguments that would break exact resume or manual
optimisation are refused with the seqtrain key to use instead.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any

from seqtrain import targets
from seqtrain.errors import ConfigError

log = logging.getLogger("seqtrain")


def tensorboard() -> dict[str, Any]:
    """The default logger node (conf/logger/tensorboard.yaml says the same; a test checks)."""
    return {
        "tensorboard": {
            "_target_": "lightning.pytorch.loggers.TensorBoardLogger",
            "name": "tensorboard",  # events in <run dir>/tensorboard/
            "version": "",  # no version_N subdirectory: a resumed run appends to its own events
            "default_hp_metric": False,  # hp/ metrics are logged once, at the end
        }
    }


_STEPS = "runs are counted in optimizer updates; use trainer.max_steps"
_CLIP = "the module clips by hand (Lightning's clipping raises under manual optimisation)"
# Trainer arguments seqtrain sets itself or that break what it guarantees, and why.
REFUSED = {
    "gradient_clip_val": f"{_CLIP}; use optim.grad_clip",
    "gradient_clip_algorithm": f"{_CLIP}; use optim.grad_clip (global norm)",
    "accumulate_grad_batches": "one update is one TBPTT window of carried state (manual "
    "optimisation): accumulating would break the carry; raise data.batch_size instead",
    "max_epochs": _STEPS,
    "min_epochs": _STEPS,
    "min_steps": _STEPS,
    "max_time": _STEPS,
    "check_val_every_n_epoch": "validation is counted in updates; use trainer.val_check_interval",
    "num_sanity_val_steps": "validation is stateful over the whole val split; no sanity pass",
    "callbacks": "add one with +callbacks.NAME._target_=CLASS, or callbacks=OPTION",
    "logger": "choose loggers with logger=csv or logger=[tensorboard,csv]",
    "enable_progress_bar": "use trainer.progress_bar",
    "plugins": "seqtrain's checkpoint plugin writes atomically; it is not replaceable",
    "use_distributed_sampler": "the streams are split by rank already",
    "default_root_dir": "the run directory is hydra.run.dir",
    # The val figure is what best.ckpt, summary.json and a sweeper go by; the train stream is
    # one pass of carried state whose cursor a checkpoint records: an epoch cut short restarts it.
    "limit_val_batches": "the val figure is taken over the whole val split (best.ckpt and "
    "summary.json go by it); validate less often with trainer.val_check_interval",
    "limit_train_batches": "an epoch cut short restarts the train stream on the same windows; "
    "use trainer.max_steps",
    "overfit_batches": "it trains on the same windows over and over; use a small data.max_bytes",
    "fast_dev_run": "it switches off checkpoints and validation; use +debug=tiny",
}


def check_trainer_args(extra: dict[str, Any]) -> None:
    """Every +trainer.NAME is a lightning.Trainer argument seqtrain lets through."""
    if not extra:
        return
    parameters = inspect.signature(targets.locate("trainer", "lightning.Trainer")).parameters
    for name, value in extra.items():
        if name in REFUSED:
            raise ConfigError(f"trainer.{name}: not settable in seqtrain: {REFUSED[name]}")
        if name not in parameters:
            raise ConfigError(
                f"trainer.{name} is not a lightning.Trainer argument; see its docs for the list"
            )
        if name == "enable_checkpointing" and not value:
            raise ConfigError(
                "trainer.enable_checkpointing=false: resume needs seqtrain's checkpoints; "
                "raise trainer.checkpoint_every to write fewer"
            )


# What a logger and a callback must be: Lightning takes anything in their place and fails later
# (a logger at its first point), or never calls it (a callback); and what seqtrain passes them.
BASES = {"logger": "lightning.pytorch.loggers.Logger", "callbacks": "lightning.pytorch.Callback"}
GIVEN = {"logger": ("save_dir",), "callbacks": ()}


def check_kind(group: str, name: str, node: dict[str, Any], made: object) -> None:
    """The class a node names, or what a function it names built, is a subclass of the group's
    Lightning base."""
    base = targets.locate(group, BASES[group])
    kind = made if isinstance(made, type) else type(made)
    if not issubclass(kind, base):
        what = "is" if isinstance(made, type) else f"built a {kind.__qualname__}, which is"
        raise ConfigError(
            f"{group}.{name}._target_={node['_target_']}: {what} not a {BASES[group]} subclass"
        )


def check(logger: dict[str, Any], callbacks: dict[str, Any]) -> None:
    """Every logger and callback node names a class that takes its arguments and is a Lightning
    Logger or Callback (a function that builds one: what it builds, when it is built)."""
    for group, nodes in (("logger", logger), ("callbacks", callbacks)):
        for name, node in nodes.items():
            targets.check(f"{group}.{name}", node, given=GIVEN[group])
            target = targets.locate(f"{group}.{name}", node["_target_"])
            if isinstance(target, type):
                check_kind(group, name, node, target)


class Switched:
    """A failed logger's `experiment`: every call is a no-op (its curves stop, the run goes on)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


# The Logger methods that write; one OSError in any of them switches the logger off.
WRITES = (
    "log_metrics",
    "log_hyperparams",
    "log_graph",
    "save",
    "finalize",
    "after_save_checkpoint",
)


def disk_reason(err: OSError) -> str:
    return "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))


def quiet_writer_thread(args: threading.ExceptHookArgs) -> None:
    """TensorBoard's writer thread dies of the OSError that the run's next write raises again,
    where `guarded` says it in one WARNING: Python's default hook printed the thread's traceback
    first. Any other thread's error is printed as before."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    threading.__excepthook__(args)


def guarded(logger: Any, key: str) -> Any:
    """The logger, made to fail in one line: a full disk or a read-only folder hit by its writer
    (TensorBoard's events, a CSV file) is one WARNING, then the logger is off for the rest of the
    run; training and its checkpoints go on where the disk allows. Its class stays a subclass of
    the logger's, so isinstance checks still hold."""
    if threading.excepthook is threading.__excepthook__:  # another hook (a test runner's) stays
        threading.excepthook = quiet_writer_thread
    base = type(logger)
    failed: list[OSError] = []

    def switch_off(err: OSError) -> None:
        if not failed:
            failed.append(err)
            log.warning(
                "logger.%s: cannot write %s (%s); its curves stop here, training and checkpoints "
                "go on",
                key,
                os.fsdecode(err.filename) if err.filename else "its files",
                disk_reason(err),
            )

    def wrap(name: str):
        method = getattr(base, name)

        def call(self, *args, **kwargs):
            if failed:
                return None
            try:
                return method(self, *args, **kwargs)
            except OSError as err:
                switch_off(err)
                return None

        return call

    def experiment(self):
        if failed:
            return Switched()
        try:
            return super(cls, self).experiment
        except OSError as err:
            switch_off(err)
            return Switched()

    methods = {name: wrap(name) for name in WRITES if hasattr(base, name)}
    methods["experiment"] = property(experiment)
    methods["switched_off"] = property(lambda self: bool(failed))
    cls = type(base.__name__, (base,), methods)
    logger.__class__ = cls
    return logger


def build_loggers(logger: dict[str, Any], run_dir: Path, first_step: int = 0) -> list:
    """The configured loggers, each writing under the run directory.

    A run resumed at update `first_step` redoes the updates after its checkpoint, whose points an
    earlier process may have written already: TensorBoard's writer is told to purge every point
    from `first_step` on (TensorBoard drops them when it reads the run), so no step shows twice.
    """
    from lightning.pytorch.loggers import TensorBoardLogger  # Lightning only once training runs

    built = []
    for key, node in logger.items():
        given: dict[str, Any] = {"save_dir": run_dir}
        target = targets.locate(f"logger.{key}", node["_target_"])
        if isinstance(target, type) and issubclass(target, TensorBoardLogger):
            given["purge_step"] = first_step
        made = targets.build(node, **given)
        check_kind("logger", key, node, made)
        built.append(guarded(made, key))
    return built


def build_callbacks(callbacks: dict[str, Any]) -> list:
    """The configured extra callbacks, in config order, after seqtrain's own."""
    built = []
    for key, node in callbacks.items():
        made = targets.build(node)
        check_kind("callbacks", key, node, made)
        built.append(made)
    return built


def log_final(loggers: list, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    """The run's hyperparameters with its final figures, then close every logger.

    TensorBoard gets them as an HParams session of its own, in the subdirectory `final/`: its
    table then lists the run's figures, and the time series get no extra cards (the figures carry
    the tags of the series they summarise, one point each, under the run `final`). Other loggers
    get the parameters and the figures as scalars at the last step.
    """
    from lightning.pytorch.loggers import TensorBoardLogger  # Lightning only once training ran

    for logger in loggers:
        if getattr(logger, "switched_off", False):  # its disk failed: said once already
            continue
        if isinstance(logger, TensorBoardLogger):
            try:
                write_hparams(Path(logger.log_dir) / "final", params, metrics, step)
            except OSError as err:
                log.warning("TensorBoard: cannot write the HParams row (%s)", disk_reason(err))
        elif "metrics" in inspect.signature(logger.log_hyperparams).parameters:
            logger.log_hyperparams(params, metrics)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(metrics, step=step)
        logger.finalize("success")


def write_hparams(
    log_dir: Path, params: dict[str, Any], metrics: dict[str, float], step: int
) -> None:
    """One HParams session in `log_dir`: the parameters, and the metrics as scalars at `step`."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    with SummaryWriter(str(log_dir)) as writer:
        for summary in hparams(params, metrics):  # experiment, session start, session end
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
