"""Callbacks: throughput accounting, text samples at validation, preemption, progress."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class Throughput(L.Callback):
    """Tokens per second of training, validation time excluded.

    Each interval runs from the end of one update to the end of the next, so data loading,
    logging and Lightning's own overhead count against seqtrain, as a user would see it.
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.tokens = 0
        self._mark: float | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._mark is None:  # first update, or the first after a validation pass
            self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        self.train_seconds += seconds
        self.tokens += outputs["tokens"]
        speed = outputs["tokens"] / seconds
        module.log("perf/tokens_per_s", speed, prog_bar=True, logger=False)
        module.log_step({"perf/tokens_per_s": speed})

    def on_validation_start(self, trainer, module) -> None:
        self._mark = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


class TextSamples(L.Callback):
    """Generate text after each validation pass and log it to TensorBoard."""

    def __init__(self, prompt: bytes, length: int) -> None:
        self.prompt, self.length = prompt, length

    def on_validation_end(self, trainer, module) -> None:
        if self.length == 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        text = module.sample(self.prompt, self.length, seed=trainer.global_step)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                # Markdown collapses whitespace; a code block shows the text as generated.
                logger.experiment.add_text("samples", f"```\n{text}\n```", trainer.global_step)


class Preemption(L.Callback):
    """SIGTERM, SIGINT and SIGUSR1 finish the current update, save a checkpoint and stop.

    The handler only records the signal; the checkpoint is written between updates, where the
    model, optimizer, data cursor and carried state agree with each other. All ranks stop at the
    same update: any rank's signal stops every rank.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, module) -> None:
        # Lightning wraps SIGTERM when fit starts (under DDP its handler kills the other ranks
        # from inside the signal handler); take it back so every signal waits for the update.
        signal.signal(signal.SIGTERM, self._handle)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # The largest signal number any rank received: every rank stops, and names the signal.
        mine = torch.tensor(self.received or 0, device=module.device)
        signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
        if not signum:
            return
        self.received = signum
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        trainer.should_stop = True

    def teardown(self, trainer, module, stage: str) -> None:
        for sig, handler in self.previous.items():  # the caller's handlers again
            signal.signal(sig, handler)

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name


class StepProgressBar(TQDMProgressBar):
    """Training is one endless pass over the streams, so the bar counts updates to max_steps."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer, module) -> None:
        super().on_train_epoch_start(trainer, module)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.set_description("train")
