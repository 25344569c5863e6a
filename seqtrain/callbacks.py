"""Callbacks: throughput accounting, text samples at validation, preemption, progress."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from seqtrain import threads

log = logging.getLogger("seqtrain")


class Throughput(L.Callback):
    """Tokens per second of training, validation time excluded.

    Each interval runs from the end of one update to the end of the next, so data loading,
    logging and Lightning's own overhead count against seqtrain, as a user would see it.
    """

    SMOOTHING = 0.1  # the weight of the newest update in the bar's figure (about the last 10)

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.tokens = 0
        self._mark: float | None = None
        self._recent = (0.0, 0.0)  # (tokens, seconds), exponentially weighted

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._mark is None:  # first update, or the first after a validation pass
            self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not outputs["tokens"]:  # an update a stop request dropped: the run is ending
            return
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        self.train_seconds += seconds
        self.tokens += outputs["tokens"]
        speed = outputs["tokens"] / seconds
        # The bar shows a smoothed figure: one update's speed jumps with every hiccup. Tokens
        # and seconds are averaged apart, so a slow update weighs by the time it took.
        w, (tokens, secs) = self.SMOOTHING, self._recent
        if not secs:
            w = 1.0
        self._recent = ((1 - w) * tokens + w * outputs["tokens"], (1 - w) * secs + w * seconds)
        module.log("perf/tokens_per_s", self.recent_tokens_per_s, prog_bar=True, logger=False)
        module.log_step({"perf/tokens_per_s": speed})

    @property
    def recent_tokens_per_s(self) -> float:
        tokens, seconds = self._recent
        return tokens / seconds if seconds else 0.0

    def on_validation_start(self, trainer, module) -> None:
        self._mark = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


class FollowLoad(L.Callback):
    """trainer.threads=auto: the thread count follows the CPUs other processes leave free
    (threads.Governor), changed between updates only."""

    def __init__(self, governor: threads.Governor) -> None:
        self.governor = governor

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.governor.tick()


class TextSamples(L.Callback):
    """Generate text after each validation pass and log it to TensorBoard."""

    def __init__(self, prompt: bytes, length: int) -> None:
        self.prompt, self.length = prompt, length

    def on_validation_end(self, trainer, module) -> None:
        if self.length == 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        text = module.sample(self.prompt, self.length, seed=trainer.global_step)
        prompt = self.prompt.decode("utf-8", errors="replace")
        generated = text[len(prompt) :] if text.startswith(prompt) else text
        # Markdown collapses whitespace; code blocks show the text as generated, the prompt
        # (the start of the val split) apart from what the model wrote after it.
        shown = (
            f"**prompt** ({len(self.prompt)} bytes of val text):\n```\n{prompt}\n```\n"
            f"**generated** (step {trainer.global_step}, {self.length} bytes):\n"
            f"```\n{generated}\n```"
        )
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", shown, trainer.global_step)


class FinalValidation(L.Callback):
    """Validate after the last update, so every finished run has its figures and a best.ckpt.

    Lightning validates when a callback sets `should_stop` (once, also when the step is a
    validation step anyway); without this a run shorter than trainer.val_check_interval would
    never be validated inside fit, and best.ckpt never written.
    """

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class BestCheckpoint(ModelCheckpoint):
    """checkpoints/best.ckpt: the weights with the best validation figure so far.

    A validation pass abandoned by a stop signal has no figure; it is not compared.
    """

    def on_validation_end(self, trainer, module) -> None:
        if module.last_val_step == trainer.global_step:
            super().on_validation_end(trainer, module)
            if trainer.is_global_zero:
                log.info(validation_line(trainer.global_step, module.last_val, self))


def validation_line(step: int, figures: dict[str, float], best: ModelCheckpoint) -> str:
    """One console line per validation pass: its figures and the best of the monitor so far
    (best.ckpt's, restored on resume)."""
    shown = "  ".join(f"{name} {value:.4f}" for name, value in figures.items())
    score = best.best_model_score
    if score is None:
        return f"validation at step {step}: {shown}"
    return f"validation at step {step}: {shown}  (best {best.monitor} {float(score):.4f})"


class Preemption(L.Callback):
    """SIGTERM, SIGINT and SIGUSR1 save a checkpoint and stop, within seconds.

    The handler only records the signal; the checkpoint is written between updates, where the
    model, optimizer, data cursor and carried state agree with each other. One process does not
    wait for a slow update to end: the engine drops it at its next segment boundary, forward or
    backward (tbptt.UpdateAbandoned), and the checkpoint is that of the update before; under
    DDP each rank finishes the update (the gradients' all-reduce needs every rank). All ranks
    stop at the same update: any rank's signal stops every rank. A stop request skips
    validation, and one that lands during a validation pass abandons it (the module's
    `stop_requested` ends the val loader, data.streams.UntilStopped), so the run ends within seconds
    and one save: preemption leaves ~30 s.
    A second signal says the save is under way; a third exits at once: checkpoints are written
    atomically, so the previous complete one stays (checkpoint.AtomicCheckpointIO). Python runs
    the handler once for signals that arrive while the main thread is inside one C call, so
    signals are counted by the watchdog, which sees every one (SignalWatchdog).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.calls = 0  # runs of the handler: fewer than the signals when several coalesce
        self.saving = False
        self.saved = False
        self.module: L.LightningModule | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self.watchdog = SignalWatchdog()

    def _handle(self, signum: int, frame) -> None:
        self.watchdog.handled()
        self.calls += 1
        count = max(self.calls, self.watchdog.delivered)  # signals received so far
        self.received = self.received or signum
        name = signal.Signals(signum).name
        if count >= 3:
            log.warning("%s again: %s", name, SignalWatchdog.ABORTING)
            os._exit(128 + signum)
        if count == 2:
            doing = f"saving {self.checkpoint}" if self.saving else "finishing the update"
            log.warning("%s: still %s; send it once more to abort at once", name, doing)
            return
        log.warning(
            "%s: stopping; saving %s as of the last completed update", name, self.checkpoint
        )
        if self.module is not None:
            self.module.stop_requested = True

    def setup(self, trainer, module, stage: str) -> None:
        self.module = module
        if self.received is not None:  # a signal before the Trainer started
            module.stop_requested = True

    def on_train_start(self, trainer, module) -> None:
        # Lightning wraps SIGTERM when fit starts (under DDP its handler kills the other ranks
        # from inside the signal handler); take it back so every signal waits for the update.
        signal.signal(signal.SIGTERM, self._handle)
        self.watchdog.grace = SignalWatchdog.TRAINING

    def _stop_if_signalled(self, trainer, module) -> None:
        """Every rank calls this at the same points: the signal is agreed on by all of them."""
        # The largest signal number any rank received: every rank stops, and names the signal.
        mine = torch.tensor(self.received or 0, device=module.device)
        signum = int(trainer.strategy.reduce(mine, reduce_op="max"))
        if not signum or self.saved:
            return
        self.received = signum
        module.stop_requested = True  # the validation Lightning runs on should_stop is skipped
        self.saving = True
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        self.saving, self.saved = False, True
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._stop_if_signalled(trainer, module)

    def on_validation_end(self, trainer, module) -> None:
        # A signal during validation: the pass was abandoned, the weights are those of the last
        # update, and the fit loop saves after validation anyway (checkpoint callbacks run last).
        if not trainer.sanity_checking:
            self._stop_if_signalled(trainer, module)

    def teardown(self, trainer, module, stage: str) -> None:
        self.module = None
        self.watchdog.close()
        for sig, handler in self.previous.items():  # the caller's handlers again
            signal.signal(sig, handler)

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name


class SignalWatchdog:
    """Every signal is counted, and a signal always ends the process, even while the main thread
    waits in C code.

    Python runs a signal handler only between bytecodes, and once for all the signals that
    arrived meanwhile: a rank blocked in a C call (the DDP rendezvous waiting for a peer that
    never comes, a collective with a dead peer, one long kernel) would ignore every SIGTERM and
    SIGINT, and three quick Ctrl-Cs would count as one. The C-level handler also writes each
    signal's number to a wakeup socket; this thread reads them. The third signal exits at once;
    and if the Python handler has not run within `grace` seconds of a signal, the main thread is
    stuck: it exits with 128 + the signal, as the signal itself would have. Checkpoints are
    written atomically, so nothing is torn.
    """

    STARTING = 3.0  # seconds, before training: nothing to save, a wait is the only thing to end
    TRAINING = 60.0  # seconds, once training runs: one long kernel must not lose the save
    # A handler run this long before the watchdog read the signal's byte counts as its run: the
    # main thread may run the handler before this thread wakes and gets the GIL.
    WAKE = 1.0  # seconds
    ABORTING = "aborting now; the previous complete checkpoint is kept"

    def __init__(self) -> None:
        self.grace = self.STARTING
        self.delivered = 0  # signals read from the socket
        self.last_handled = -math.inf  # time.monotonic() of the handler's last run
        self.reader, writer = socket.socketpair()
        writer.setblocking(False)
        self.writer = writer
        self.previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="seqtrain-signals", daemon=True)
        self.thread.start()

    def handled(self) -> None:
        """The Python handler calls this: the main thread is running bytecode."""
        self.last_handled = time.monotonic()

    def _watch(self) -> None:
        self.reader.settimeout(0.05)
        waiting = None  # when the oldest signal the handler has not run for was read
        while True:
            try:
                data = self.reader.recv(64)
            except TimeoutError:
                data = None
            else:
                if not data:  # closed
                    return
            now = time.monotonic()
            for signum in data or ():
                self.delivered += 1
                last = signum
                if self.delivered >= 3:
                    self._exit(signum, f"{signal.Signals(signum).name} again: {self.ABORTING}")
            if data and waiting is None:
                waiting = now
            if waiting is not None and self.last_handled >= waiting - self.WAKE:
                waiting = None
            elif waiting is not None and now > waiting + self.grace:
                self._exit(last, f"{signal.Signals(last).name} while blocked in a wait: exiting")

    @staticmethod
    def _exit(signum: int, line: str) -> None:
        # No logging here: the stuck main thread may hold the logging lock.
        os.write(2, f"seqtrain: {line}\n".encode())
        os._exit(128 + signum)

    def close(self) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        self.writer.close()  # the reader sees end of file and the thread ends
        self.thread.join(timeout=1.0)
        self.reader.close()


class StepProgressBar(TQDMProgressBar):
    """Training is one endless pass over the streams, so the bar counts updates to max_steps.

    The bar goes to stderr, the stream train.build_trainer asks whether it is a terminal; the
    log lines go to stdout, so `> log.txt` keeps the bar on the screen and control codes out of
    the file.
    """

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def init_train_tqdm(self) -> Tqdm:
        # Lightning's, on stderr, counting from the resumed step of max_steps from the first
        # frame (a resumed run starts mid-epoch, where Lightning would show 309/?).
        return Tqdm(
            desc="train",
            total=self.trainer.max_steps,
            initial=self.trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def init_validation_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's bars write to sys.stdout
            return super().init_validation_tqdm()

    def on_train_epoch_start(self, trainer, module) -> None:
        """Nothing: Lightning's would reset the bar to 0 of an epoch; there is one endless one."""

    def get_metrics(self, trainer, module) -> dict[str, int | str | float | dict[str, float]]:
        """The bar's figures as a reader wants them: the task's headline figure of the last
        update (bpc for lm) beside its loss, and tokens/s smoothed (Throughput) with thousands
        separators, not `4.81e+3`."""
        items = super().get_metrics(trainer, module)
        speed = items.pop("perf/tokens_per_s", None)
        task = module.task
        figure = task.figures(module.train_loss, "train").get(task.monitor)
        shown = {}
        for name, value in items.items():
            shown[name] = value
            if name == "train/loss" and figure is not None:  # the headline beside its loss
                shown[f"train/{task.monitor}"] = f"{figure:.3f}"
        if speed is not None:
            shown["tokens/s"] = f"{float(speed):,.0f}"
        return shown


class ProgressLines(L.Callback):
    """With no terminal (nohup, SLURM, a pipe): a plain log line every `every` updates or
    `seconds`, whichever comes first, with the step, loss, speed and time left."""

    def __init__(self, every: int, seconds: float, file_only: bool = False) -> None:
        self.every, self.seconds = every, seconds
        # Beside a bar on a terminal the lines go to the log file (cli.log) alone: the console
        # has the bar, the file a record of progress.
        self.file_only = file_only
        self._start: tuple[float, int, int] | None = None  # (time, step, tokens) at the start
        self._last: tuple[float, int] = (0.0, 0)  # (time, step) of the last line

    def on_train_start(self, trainer, module) -> None:
        now = time.perf_counter()
        self._start = (now, trainer.global_step, module.tokens_seen)
        self._last = (now, trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now, step = time.perf_counter(), trainer.global_step
        last_time, last_step = self._last
        due = step - last_step >= self.every or now - last_time >= self.seconds
        if not trainer.is_global_zero or not (due or step >= trainer.max_steps):
            return
        self._last = (now, step)
        start_time, start_step, start_tokens = self._start
        elapsed = now - start_time  # validation included: the time left is wall-clock time
        speed = (module.tokens_seen - start_tokens) / elapsed if elapsed else 0.0
        left = elapsed / (step - start_step) * (trainer.max_steps - step)
        figures = module.task.metrics(module.train_loss)
        shown = "  ".join(f"{name} {value:.4f}" for name, value in figures.items())
        line = (
            f"step {step}/{trainer.max_steps} ({100 * step // trainer.max_steps}%)  "
            f"loss {module.train_loss:.4f}  {shown}  {speed:,.0f} tokens/s  ETA {duration(left)}"
        )
        if not self.file_only:
            log.info(line)
            return
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m: what a progress line needs, no more."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
