"""LightningModule: manual optimisation around the TBPTT engine.

Lightning 2.x has no truncated BPTT and forbids Trainer-level gradient clipping under manual
optimisation, so one `training_step` here is one engine update: forward + backward over the
window, clip, optimizer step, LR schedule step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import resource
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from seqtrain import optim
from seqtrain.config import Config, from_dict, to_dict
from seqtrain.data import DataSpec, Window, longest_window
from seqtrain.errors import NonFiniteError
from seqtrain.memory import PeakMeter, plan_chunk
from seqtrain.model import activation_penalty
from seqtrain.tasks import build_model, build_task
from seqtrain.tbptt import Engine, UpdateAbandoned

log = logging.getLogger("seqtrain")
MIB = 1 << 20  # TensorBoard's memory figures are in MiB: a reader can tell 143.9 from 150873702


def host_rss_bytes() -> int:
    """The process's resident-set high-water mark (memory.host_cache trades it for speed)."""
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def rng_state() -> dict:
    """Every generator a step can draw from, in checkpoint-safe types (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# Lightning's loop counters in a checkpoint (internal layout, checked where it is read).
BATCHES = (
    "epoch_loop.batch_progress",
    ("total", "current"),
    ("ready", "started", "processed", "completed"),
)


def uncount_batch(checkpoint: dict) -> None:
    """Take the last batch out of the fit loop's counters in `checkpoint`: Lightning counts a
    training_step whose update a stop dropped as a batch done, and validation (every
    trainer.val_check_interval batches) and the logging step would then run one batch early
    for the whole resumed run. The layout is Lightning's internal one: a changed layout is one
    warning (the resumed run's updates stay exact; its validation steps would move)."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        progress = loop["epoch_loop.batch_progress"]
        for scope in ("total", "current"):
            for counter in ("ready", "started", "processed", "completed"):
                progress[scope][counter] -= 1
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    except (KeyError, TypeError) as err:
        log.warning(
            "the checkpoint's loop counters are not where this Lightning version kept them (%s); "
            "a resumed run validates one update early",
            err,
        )


class SequenceModule(L.LightningModule):
    """One task (tasks.py) trained with the TBPTT engine; metrics are named by the task."""

    def __init__(self, config: dict, spec: dict) -> None:
        super().__init__()
        # The whole config and the data spec (input kind and sizes) go into every checkpoint:
        # sampling and evaluation rebuild the model from the file alone. Logged to TensorBoard
        # once, at the end.
        self.save_hyperparameters(logger=False)
        self.cfg: Config = from_dict(config)
        self.task = build_task(self.cfg.task, DataSpec(**spec))
        self.model = build_model(self.cfg.model, self.task)
        t = self.cfg.tbptt
        longest = longest_window(t.window) if t.vary else t.window  # what memory is planned for
        chunk = plan_chunk(self.cfg.memory, longest)
        penalty = activation_penalty(self.cfg.model)  # model.ar, model.tar
        self.engine = Engine(
            self.model, self.task, t.window, t.stride, t.carry, chunk, penalty, longest
        )
        # optim.average: validation, best.ckpt and sampling read its mean once it has started
        self.average = optim.build_average(self.cfg.optim)
        self.memory_plan: dict | None = None  # the measured memory plan (train.plan_chunks sets it)
        self.saved_bytes = 0  # the most any update saved for backward
        self.peak_bytes: int | None = None  # the highest update peak (CUDA) or the probe's (CPU)
        self.automatic_optimization = False
        self.tokens_seen = 0
        self.windows_seen = 0  # the data cursor: windows trained on since the run began
        self.skipped_steps = 0
        self.train_loss = math.nan  # the last update's (kept in checkpoints for the summary)
        self.consecutive_skips = 0
        self.restored_rng: dict | None = None
        self.val_sums = (0.0, 0)  # (summed loss, target elements) over the running val pass
        self.last_val_step = -1
        self.last_val: dict[str, float] = {}
        # Set by callbacks.Preemption on a stop signal: validation steps do nothing from then on,
        # and a pass cut short this way reports no figures (best.ckpt ignores it).
        self.stop_requested = False
        self.dropped_update = False  # the last training_step was cut short (abandon_update)

    @classmethod
    def from_config(cls, cfg: Config, spec: DataSpec) -> SequenceModule:
        return cls(to_dict(cfg), dataclasses.asdict(spec))

    def configure_optimizers(self):
        """The configured optimizer (optim.optimizer) and LR schedule (optim.schedule)."""
        optimizer, schedule = optim.build(self.cfg.optim, self.model)
        return [optimizer], [schedule]

    def training_step(self, batch: Window, batch_idx: int) -> dict:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        draws = self.rng_before_update()
        try:
            with PeakMeter(self.device) as peak:
                result = self.engine.train_update(batch, self.manual_backward)
        except UpdateAbandoned:
            return self.abandon_update(optimizer, draws)
        self.windows_seen += 1
        # DDP: each rank's loss is the mean over its own B x k1 new tokens, and DDP averages the
        # gradients over ranks. Every rank trains the same number of tokens, so the mean of the
        # ranks' means is the mean over the global batch: the gradient of one process with
        # world_size x B streams. The logged loss is averaged over ranks alike (sync_dist).
        tokens = result.tokens * self.trainer.world_size  # this update's tokens, all ranks
        self.tokens_seen += tokens
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip is not None else math.inf
        )
        finite = math.isfinite(result.loss) and bool(torch.isfinite(grad_norm))
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            with optim.scaled_lr(optimizer, self.lr_scale(batch)):
                optimizer.step()
            schedule.step()
            self.average.update(self.model)
            self.consecutive_skips = 0
        else:
            self.skip_update(result.loss, float(grad_norm))
        optimizer.zero_grad(set_to_none=True)
        # DDP: the logged loss is the mean over ranks, the loss of the global batch.
        loss = float(
            self.trainer.strategy.reduce(
                torch.tensor(result.loss, device=self.device), reduce_op="mean"
            )
        )
        self.train_loss = loss
        self.log("train/loss", loss, prog_bar=True, logger=False)
        self.log_step(
            {
                "train/loss": loss,
                **{f"train/{k}": v for k, v in self.task.figures(loss, "train").items()},
                "optim/lr": schedule.get_last_lr()[0],
                "optim/grad_norm": float(grad_norm),
                "optim/skipped_steps": float(self.skipped_steps),
                **self.memory_metrics(peak.bytes),
            }
        )
        return {"tokens": tokens}

    def rng_before_update(self) -> tuple[Tensor, Tensor | None]:
        """The generators an update draws from (dropout), to undo the draws of an abandoned one."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def abandon_update(self, optimizer, draws: tuple[Tensor, Tensor | None]) -> dict:
        """A stop request cut the update short (tbptt.UpdateAbandoned): drop its partial
        gradients and random draws. The weights, optimizer, carried state and data cursor are
        still the last completed update's, which callbacks.Preemption saves next."""
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(draws[0])
        if draws[1] is not None:
            torch.cuda.set_rng_state(draws[1], self.device)
        log.info("stop: the update after step %d was dropped unfinished", self.global_step)
        self.dropped_update = True
        return {"tokens": 0}

    def on_train_start(self) -> None:
        # One process: a stop request drops a slow update at the next segment boundary. Under
        # DDP every rank must finish it (the gradients' all-reduce waits for all of them).
        if self.trainer.world_size == 1:
            self.engine.stop = lambda: self.stop_requested
        # Applied here, right before the first update, so nothing in Lightning's start-up can
        # draw from the restored generators first.
        if self.restored_rng is not None:
            set_rng_state(self.restored_rng)
            self.restored_rng = None

    def lr_scale(self, window: Window) -> float:
        """tbptt.vary: an update of L steps takes a step of lr * L / window (awd-lstm-lm), so a
        token weighs the same in a long window as in a short one; fixed windows: 1."""
        t = self.cfg.tbptt
        return window.inputs.shape[1] / t.window if t.vary else 1.0

    def log_step(self, metrics: dict[str, float]) -> None:
        """Write this update's scalars to the loggers now, every trainer.log_every_n_steps.

        self.log would hand them over only after the update's callbacks, and so after a
        checkpoint saved at the end of the update: a run killed in between and resumed from that
        checkpoint would have a gap in its curves. on_save_checkpoint flushes what is written here.
        """
        if self.windows_seen % self.trainer.log_every_n_steps == 0:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.windows_seen - 1)

    def memory_metrics(self, peak: int | None) -> dict[str, float]:
        """This update's memory in MiB: saved for backward, the process's resident high-water
        mark, and on CUDA the update's peak. On CPU the peak is the probe's single measurement
        (the profiler is too slow for every update): it is logged once, with the run's figures.
        """
        self.saved_bytes = max(self.saved_bytes, self.engine.saved_bytes)
        metrics = {
            "memory/saved_MiB": self.engine.saved_bytes / MIB,
            "memory/host_rss_MiB": host_rss_bytes() / MIB,
        }
        if peak is not None:
            metrics["memory/peak_MiB"] = peak / MIB
        elif self.memory_plan is not None:
            peak = self.memory_plan["peak_bytes"]
        if peak is not None:
            self.peak_bytes = max(self.peak_bytes or 0, peak)
        return metrics

    def skip_update(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient: no optimizer step, and the carried state (which may be
        poisoned) starts again from zero. Too many in a row stop the run, keeping the weights
        from before the first one (skipped updates never touched them)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.engine.reset_state()
        log.warning(
            "non-finite update skipped at step %d (loss %s, grad norm %s); %d in a row",
            self.global_step,
            loss,
            grad_norm,
            self.consecutive_skips,
        )
        limit = self.cfg.optim.max_skipped
        if self.consecutive_skips >= limit:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / "nonfinite.ckpt"
            self.trainer.save_checkpoint(path, weights_only=False)
            raise NonFiniteError(
                f"{limit} consecutive non-finite updates (optim.max_skipped) at step "
                f"{self.global_step}; weights from before the first one saved to {path}; "
                "lower optim.lr or tighten optim.grad_clip"
            )

    def on_validation_epoch_start(self) -> None:
        self.val_sums = (0.0, 0)
        self.average.use_average(self.model)  # once started, validation reads the mean

    def validation_step(self, batch: Window, batch_idx: int) -> None:
        if self.stop_requested:  # the run is stopping: the rest of the pass is skipped
            return
        total, count = self.engine.eval_window(batch)
        self.val_sums = (self.val_sums[0] + total, self.val_sums[1] + count)

    def on_validation_epoch_end(self) -> None:
        # First, before any checkpoint callback saves: training goes on with the raw weights.
        self.average.use_raw(self.model)
        # Each rank read its own block of the val streams: the split's figure is all ranks' summed
        # loss over all ranks' targets (reduce is the identity on one device). A pass any rank
        # abandoned (a stop signal) has no figure.
        stopped = float(self.stop_requested)
        sums = torch.tensor((*self.val_sums, stopped), dtype=torch.float64, device=self.device)
        total, count, stopped = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        if count == 0 or stopped:
            return
        loss = total / count
        figures = self.task.figures(loss, "val")
        self.last_val = {"val/loss": loss, **{f"val/{k}": v for k, v in figures.items()}}
        self.last_val_step = self.global_step
        # For the progress bar and best.ckpt's monitor; not for the loggers, where Lightning would
        # add an `epoch` scalar (a count of passes over the streams, not of data seen).
        self.log_dict(self.last_val, prog_bar=True, logger=False, sync_dist=True)
        for logger in self.loggers:
            logger.log_metrics(self.last_val, step=self.global_step)
        self.validated(loss)

    def validated(self, loss: float) -> None:
        """Give the pass's loss to the weight average (optim.average), which may start it now;
        optim/averaging is 1 from the pass that started it on."""
        if not self.average.enabled:
            return
        if (
            self.average.validated(loss, self.global_step, self.model)
            and self.trainer.is_global_zero
        ):
            log.info(
                "optim.average=%s: val loss %.4f at step %d is worse than the best before the "
                "last %d passes; averaging the weights from here on (validation, best.ckpt, "
                "evaluate and sample read the average)",
                self.cfg.optim.average,
                loss,
                self.global_step,
                self.cfg.optim.nonmono,
            )
        for logger in self.loggers:
            logger.log_metrics({"optim/averaging": float(self.average.active)}, self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What Lightning does not keep: the data cursor, the carried state and the RNGs.

        The logs go to disk first, so a checkpoint never holds updates its curves lack.
        """
        for logger in self.loggers:
            logger.save()
        checkpoint["seqtrain"] = {
            "engine": self.engine.state_dict(),
            "windows": self.windows_seen,
            "tokens": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "train_loss": self.train_loss,
            "rng": rng_state(),
        }
        if self.trainer.world_size > 1:
            # Every rank carries its own streams' state, cursor and RNGs, but only rank 0 writes
            # the file: all ranks' loop states go in, by global rank, and each takes its own back.
            own = apply_to_collection(checkpoint["seqtrain"], Tensor, Tensor.cpu)
            ranks: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, own)
            checkpoint["seqtrain"]["ranks"] = ranks
        # The same on every rank (as the weights are), so kept once, outside the ranks' states;
        # checkpoint.load_model evaluates with its mean.
        checkpoint["seqtrain"]["average"] = self.average.state_dict()
        if self.dropped_update:
            uncount_batch(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        loop = checkpoint["seqtrain"]
        if "ranks" in loop or self.trainer.world_size > 1:
            loop = self._own_rank_state(loop.get("ranks", [loop]))
        self.engine.load_state_dict(loop["engine"])
        self.windows_seen, self.tokens_seen = loop["windows"], loop["tokens"]
        self.skipped_steps, self.train_loss = loop["skipped_steps"], loop["train_loss"]
        self.restored_rng = loop["rng"]
        self.average.load_state_dict(checkpoint["seqtrain"].get("average"), self.model)

    def _own_rank_state(self, ranks: list) -> dict:
        """This rank's loop state (its streams exist only at the world size that wrote them)."""
        world = self.trainer.world_size
        if len(ranks) != world:
            raise ValueError(
                f"the checkpoint holds the streams of {len(ranks)} rank(s) but this run has {world}"
                f" (trainer.devices x trainer.num_nodes); resume with {len(ranks)}"
            )
        return move_data_to_device(ranks[self.global_rank], self.device)

    def sample(self, prompt: bytes, length: int, seed: int = 0) -> str:
        """Text generated from the weights evaluation reads (tasks that generate text); train
        mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with self.average.applied(self.model):  # the weights evaluation reads
            text = self.task.generate(self.model, prompt, length, generator=generator)
        self.model.train(was_training)
        return text
