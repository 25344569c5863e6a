"""`python -m seqtrain` / `seqtrain`: Hydra composes conf/, seqtrain validates, train.run trains."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
import traceback
import urllib.parse
from pathlib import Path
from typing import TextIO

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seqtrain import completion, rundir, targets
from seqtrain.config import schema, unknown_key, validate
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.hydra_compat import parse_args
from seqtrain.tool_args import plugin_failed

log = logging.getLogger("seqtrain")


CONF_DIR = completion.conf_dir()


def say(message: str, level: int = logging.INFO, file: TextIO | None = None) -> None:
    """Print a line as it is (no log prefix) and record it in the run's log, cli.log.

    The console's last lines (the result, a stop and its resume command, an error) are what a
    user looks for later in the log; the file handlers are Hydra's, absent outside a run.
    """
    stream = file or sys.stdout
    try:
        print(message, file=stream, flush=True)
    except BrokenPipeError:  # the reader is gone (Ctrl-C on `seqtrain ... | tee log` ends tee)
        # Later writes (and the interpreter's flush at exit) go nowhere instead of failing; the
        # record below still reaches cli.log.
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    record = log.makeRecord(log.name, level, __file__, 0, message.strip(), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(message: str) -> None:
    """One line and a non-zero exit; the traceback only when HYDRA_FULL_ERROR=1 asks for it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    say(f"seqtrain: error: {message}", logging.ERROR, sys.stderr)
    sys.exit(2)


def record_config(raw: DictConfig, run_dir: Path) -> None:
    """Hydra's .hydra/ record, written only once the run is known to start (hydra.output_subdir
    is null so that a refused run leaves an earlier run's record untouched)."""
    record = run_dir / ".hydra"
    hydra_cfg = HydraConfig.get()
    try:
        record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(raw, record / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), record / "overrides.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")
    except OSError as err:
        reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror
        raise ConfigError(f"hydra.run.dir={run_dir}: cannot write .hydra/ ({reason})") from None


def hydra_value(text: str) -> str:
    """A string as a Hydra override value: as it is when Hydra reads it back unchanged, else in
    double quotes (a comma would make a sweep, a quote or a bracket a parse error)."""
    if re.fullmatch(r"[\w/.\-+@: ]+", text) and text == text.strip():
        return text
    # Hydra reads a backslash as an escape only before a quote (or the closing one)
    escaped = re.sub(r'(\\+)(?="|$)', lambda m: m.group(1) * 2, text).replace('"', '\\"')
    return f'"{escaped}"'


def start_record(raw: DictConfig, run_dir: Path, board: Path | None) -> None:
    """Right before the first update, once every check passed: the .hydra/ record, and where
    the results go (said again at the end), so TensorBoard can be opened while it trains."""
    record_config(raw, run_dir)
    say(f"run directory: {run_dir}")
    if board is not None:
        say(f"tensorboard --logdir {shlex.quote(str(board))}")


def tensorboard_dir(logger: dict, run_dir: Path) -> Path | None:
    """The folder of the run's TensorBoard events (<run dir>/tensorboard by default), None without
    a TensorBoard logger. TensorBoard opened on it names the curves `.` and the HParams row
    `final`, as in the README's screenshots; opened on the run directory, `tensorboard` and
    `tensorboard/final`."""
    from lightning.pytorch.loggers import TensorBoardLogger  # imported by training already

    for key, node in logger.items():
        if issubclass(targets.locate(f"logger.{key}", node["_target_"]), TensorBoardLogger):
            version = node.get("version")  # "": no version_N folder (conf/logger/tensorboard)
            name = node.get("name", "lightning_logs")  # Lightning's default
            return run_dir / str(name) / (version if isinstance(version, str) else "")
    return None


def resume_command(run_dir: Path) -> str:
    """The command that continues this run, to paste into a shell: each argument shell-quoted,
    the folder quoted for Hydra too."""
    overrides = [
        o
        for o in HydraConfig.get().overrides.task
        if not o.startswith(("resume=", "ckpt_path=", "hydra.run.dir="))
    ]
    args = [*overrides, "resume=auto", f"hydra.run.dir={hydra_value(str(run_dir))}"]
    return " ".join(["python -m seqtrain", *map(shlex.quote, args)])


# The folders of the sweep jobs that failed (a failed job does not stop a sweep): those run in
# this process, and those a launcher ran elsewhere (SweepFailures finds their error.txt).
FAILED_JOBS: list[Path] = []


class SweepFailures(Callback):
    """Counts a sweep's failed jobs whatever the launcher: submitit runs each job in its own
    process, where `job_failed` records the failure only as the job folder's error.txt, so at the
    sweep's end this collects the error.txt files written since the sweep began."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        known = {path.resolve() for path in FAILED_JOBS}
        for error in sorted(Path(config.hydra.sweep.dir).rglob("error.txt")):
            job = error.parent.resolve()
            if job not in known and error.stat().st_mtime >= self.started - 1.0:  # 1 s: mtime
                FAILED_JOBS.append(error.parent)  # resolution; older files are earlier sweeps'


def job_failed(message: str, run_dir: Path) -> float:
    """A single run exits with the one line. In a sweep the job's folder records the error
    (error.txt; the report lists the job as failed) and the sweep goes on: the job's objective
    is NaN, which sweepers treat as a failed trial."""
    from seqtrain.machine import in_multirun

    if not in_multirun():
        fail(message)
    say(f"seqtrain: error: job {run_dir}: {message}", logging.ERROR, sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_atomic(run_dir / "error.txt", message + "\n")
        record = run_dir / ".hydra" / "overrides.yaml"
        if not record.parent.exists():  # a job refused early: its own overrides for the report
            record.parent.mkdir()
            task = list(HydraConfig.get().overrides.task)
            rundir.write_atomic(record, OmegaConf.to_yaml(OmegaConf.create(task)))
    except OSError:
        pass  # the stderr line is the record then
    FAILED_JOBS.append(run_dir)
    return math.nan


def tensorboard_url(monitor: str, base: str = "http://localhost:6006") -> str:
    """TensorBoard's time series with the loss and the task's figure pinned on top, unsmoothed.

    TensorBoard sorts scalar groups by name (memory/, optim/, perf/ before train/, val/), so
    what matters is pinned instead; and its default smoothing (0.6) bends a curve of a handful
    of validations far from its values (1.95 drawn at the end of the README's run, whose val/bpc
    is 1.859), so smoothing is 0. Both are query parameters the time-series page reads
    (TensorBoard 2.21's `deserializeQueryParams`: `pinnedCards`, and `smoothing`, which
    overrides the stored setting); tests/test_cli.py checks the installed TensorBoard's page
    still reads them.
    """
    figure = monitor.partition("/")[2]  # bpc for lm, nmse for regression
    tags = [f"{split}/{name}" for name in ("loss", figure) for split in ("train", "val")]
    pins = json.dumps([{"plugin": "scalars", "tag": tag} for tag in tags], separators=(",", ":"))
    return f"{base}/?pinnedCards={urllib.parse.quote(pins)}&smoothing=0#timeseries"


# A disk that is full or refuses the write: the user's to fix, so one line, not a traceback.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def disk_line(err: OSError, run_dir: Path) -> str:
    reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror
    then = (
        f"resume with: {resume_command(run_dir)}"
        if any((run_dir / "checkpoints").glob("*.ckpt"))
        else "run the command again"
    )
    return f"cannot write {err.filename or run_dir} ({reason}); free space or fix it, then {then}"


class HeldLog(logging.Handler):
    """Hydra's job log (cli.log) held back until the run is known to start: a run refused because
    its folder is another run's (or its input is bad) writes nothing into that folder's log.

    A log file that cannot be written (a full disk, gone read-only) is one warning line, then the
    console only: logging itself would print a traceback for every record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.root = logging.getLogger()
        self.files = [h for h in self.root.handlers if isinstance(h, logging.FileHandler)]
        self.broken: list[logging.Handler] = []
        for handler in self.files:
            self.root.removeHandler(handler)
            handler.handleError = lambda record, handler=handler: self.fail(handler)
        self.root.addHandler(self)

    def fail(self, handler: logging.FileHandler) -> None:
        self.root.removeHandler(handler)
        if handler not in self.broken:
            self.broken.append(handler)
            err = sys.exc_info()[1]
            print(
                f"seqtrain: warning: cannot write {handler.baseFilename} "
                f"({getattr(err, 'strerror', None) or err}); the log goes on on the console only",
                file=sys.stderr,
            )

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def let_go(self, keep: bool) -> None:
        """The run starts (keep: the held lines go to the log, which stays attached) or was
        refused (the lines are dropped and the log stays detached). Only the first call acts. The
        empty log Hydra made for a refused run goes too: the folder may be another run's (one
        holding its lock), and a log of earlier runs is never empty."""
        if self not in self.root.handlers:
            return
        self.root.removeHandler(self)
        for handler in [] if keep else self.files:
            handler.close()
            with contextlib.suppress(OSError):
                if os.path.getsize(handler.baseFilename) == 0:
                    os.unlink(handler.baseFilename)
        for handler in self.files if keep else []:
            for record in self.records:
                if handler in self.broken:
                    break
                if record.levelno >= handler.level:
                    handler.handle(record)
            if handler not in self.broken:
                self.root.addHandler(handler)
        self.records.clear()


class Interrupted(BaseException):
    """SIGTERM before training (Preemption owns the signals once training runs): unwinds like
    Ctrl-C's KeyboardInterrupt, so temp files are removed and the lock released on the way out."""


def raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def exception_line(err: BaseException) -> str:
    """A plain exception (a user's plug-in, a bug) in one line: its type, its message's first
    line and the frame that raised it, which is the plug-in's own when the error is in its code."""
    text = str(err).strip().splitlines()
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (raised at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {text[0] if text else ''}{where}"


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(raw: DictConfig) -> float:
    from lightning.pytorch.utilities import rank_zero_only

    from seqtrain import (  # heavy imports (Lightning) only once the config is known good
        machine,
        train,
    )

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # Under DDP every rank runs this function; one of them owns the folder, speaks and writes.
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    lock, prepared = None, False
    held = HeldLog()
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        if rank_zero:
            lock = rundir.acquire(run_dir)
        job = train.prepare(validate(raw), run_dir)
        prepared = True
        held.let_go(keep=True)
        return run_job(raw, job, run_dir, rank_zero)
    except (KeyboardInterrupt, Interrupted) as err:  # outside training (Preemption's there)
        rundir.release(lock)
        if not prepared:
            rundir.discard_if_empty(run_dir)
        name = "SIGINT" if isinstance(err, KeyboardInterrupt) else str(err)
        when = "after training" if prepared else "before training started"
        then = (
            f"resume with: {resume_command(run_dir)}"
            if any((run_dir / "checkpoints").glob("last*.ckpt"))
            else "nothing was saved; run the same command again to start"
        )
        say(f"seqtrain: error: interrupted ({name}) {when}; {then}", logging.ERROR, sys.stderr)
        sys.exit(128 + int(getattr(signal, name)))  # a sweep stops too, as if killed
    except Exception as err:  # every failure releases the folder and leaves one line
        rundir.release(lock)
        if not prepared:
            rundir.discard_if_empty(run_dir)
        if isinstance(err, SeqtrainError):
            return job_failed(str(err), run_dir)
        if isinstance(err, OSError) and err.errno in DISK_ERRORS:
            return job_failed(disk_line(err, run_dir), run_dir)
        if not machine.in_multirun():
            plugin_failed(err, lambda line: say(line, logging.ERROR, sys.stderr))  # and its frame
            raise  # a bug: its traceback, the lock released
        return job_failed(exception_line(err), run_dir)
    finally:
        held.let_go(keep=prepared)
        rundir.release(lock)
        signal.signal(signal.SIGTERM, previous)


def run_job(raw: DictConfig, job, run_dir: Path, rank_zero: bool) -> float:
    """Train a prepared job in the folder this process owns; print where its results are."""
    from seqtrain import train

    if rank_zero:
        rundir.remove_orphans(run_dir)
    board = tensorboard_dir(job.cfg.logger, run_dir)
    summary = train.fit(job, (lambda: start_record(raw, run_dir, board)) if rank_zero else None)
    if "stopped_by" in summary:
        stopped, step, ckpt = summary["stopped_by"], summary["steps"], summary["checkpoint"]
        for sig in train.Preemption.SIGNALS:  # saved and ending: nothing left to stop
            signal.signal(sig, signal.SIG_IGN)
        if rank_zero:
            say(f"\n{stopped}: stopped after step {step}; saved {ckpt}")
            say(f"resume with: {resume_command(run_dir)}")
        sys.exit(128 + int(getattr(signal, stopped)))  # as if the signal had killed it
    objective = summary[summary["monitor"].replace("/", "_")]  # the task's primary figure
    if rank_zero:
        if job.finished:
            say(f"\n{run_dir} had finished: nothing to train; its results are unchanged")
        say(f"\nrun directory: {run_dir}")
        speed = summary["tokens_per_s"]
        rate = "no update ran: no throughput" if speed is None else f"{speed:,.0f} tokens/s"
        say(f"{summary['monitor']}: {objective:.4f}  ({rate})")
        if board is not None:
            say(f"tensorboard --logdir {shlex.quote(str(board))}")
            say(f"  then open {tensorboard_url(summary['monitor'])}")
    return objective  # what a Hydra sweeper minimises: val/bpc for lm, val/nmse for regression


MISSING_KEY = object()


def composition_error(err: Exception) -> ConfigError:
    """Hydra's many-line composition errors as seqtrain's one line naming the key."""
    if isinstance(err, MissingConfigException) and err.options is not None:
        group, _, value = (err.missing_cfg_file or "").rpartition("/")
        options = ", ".join(sorted(err.options))
        return ConfigError(f"{group}={value}: no such option; choose from {options}")
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        if "not in struct" in str(cause) or "not in" in str(cause).splitlines()[0]:
            return unknown_key(cause.full_key)
        return ConfigError(f"{cause.full_key}: {str(cause).splitlines()[0]}")
    text = str(err).strip()
    append = re.search(r"To append to your default list use (\S+)", text)
    if append:  # a group outside the defaults list (experiment, debug) is added with +
        group = append.group(1).lstrip("+").partition("=")[0]
        return ConfigError(
            f"{group}: not in the base config's defaults list; add it with a +: {append.group(1)}"
        )
    # An error inside a config file: Hydra folds the OmegaConf error into its text.
    where = re.match(r"In '([^']+)'", text)
    key = re.search(r"full_key: (\S+)", text)
    lines = text.splitlines()
    detail = lines[1].strip() if len(lines) > 1 and where else lines[0]
    group = where.group(1).split("/")[0] if where else None
    if key and " not in " in detail and key.group(1).split(".")[0] == group:
        # The file's keys landed under its group's name: a patch of the whole config (an
        # experiment) needs Hydra's package header, as conf/experiment/char_lm.yaml has.
        detail = (
            f"its keys landed under '{group}.'; start the file with the line "
            "'# @package _global_' (as conf/experiment/char_lm.yaml does)"
        )
    elif key and " not in " in detail:
        detail = str(unknown_key(key.group(1)))
    elif key:
        detail = f"{key.group(1)}: {detail}"
    return ConfigError(f"{where.group(1)}.yaml: {detail}" if where else detail)


def sweep_choices(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """The single-run override lists that cover every value of a sweep (each value of each swept
    key once), and the keys of sweeps without a list of values (interval(...): Optuna's)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept = {}
    ranged = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                swept[o.get_key_element()] = list(o.sweep_string_iterator())
            except (TypeError, ValueError, AssertionError):
                ranged.append(o.key_or_group)
    first = [f"{key}={values[0]}" for key, values in swept.items()]
    runs = [fixed + first]
    for i, (key, values) in enumerate(swept.items()):
        for value in values[1:]:
            runs.append(fixed + first[:i] + [f"{key}={value}"] + first[i + 1 :])
    return runs, ranged


def check_run_dir(overrides: list[str]) -> None:
    """A run folder Hydra cannot create or write its log into fails inside Hydra, in many lines."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") not in ("hydra.run.dir", "hydra.sweep.dir") or "$" in value:
            continue
        path = Path(value.strip("'\""))
        if path.parts and path.parts[0].startswith("~"):  # Hydra would make a folder named ~
            raise ConfigError(
                f"{key}={value}: Hydra does not expand ~; write the folder out: "
                f"{key}={path.expanduser()}"
            )
        near = next((p for p in (path, *path.parents) if p.exists()), None)
        if near is not None and not near.is_dir():
            raise ConfigError(f"{key}={value}: {near} is a file; choose a folder")
        if near is not None and not os.access(near, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value}: {near} is not writable; choose another folder")
        log_file = path / "cli.log"  # Hydra's job log (hydra.job.name is cli), opened first
        run = key.lstrip("+") == "hydra.run.dir"
        if run and log_file.exists() and not os.access(log_file, os.W_OK):
            raise ConfigError(
                f"{key}={value}: its {log_file.name} is not writable; fix its permissions or "
                "choose another folder"
            )


def check_command_line(args: argparse.Namespace) -> None:
    """Compose the config as Hydra will (same primary config, --config-dir and hydra.searchpath)
    and report what fails in one line, before Hydra itself would print many."""
    config_dir = Path(args.config_path).resolve() if args.config_path else CONF_DIR
    overrides = list(args.overrides)
    if args.config_dir is not None:
        extra = Path(args.config_dir).resolve()
        if not extra.is_dir():
            raise ConfigError(f"--config-dir {args.config_dir}: no such directory")
        parsed = OverridesParser.create().parse_overrides(overrides)
        given = [o for o in parsed if o.key_or_group == "hydra.searchpath"]
        paths = [f"file://{extra}", *(given[-1].value() if given else [])]
        overrides = [o.input_line for o in parsed if o.key_or_group != "hydra.searchpath"]
        overrides.append("hydra.searchpath=[" + ",".join(f"'{p}'" for p in paths) + "]")
    try:
        runs, ranged = sweep_choices(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"override syntax: {str(err).splitlines()[0]}") from None
    check_run_dir(overrides)
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        for run in runs:
            try:
                cfg = compose(args.config_name or "train", overrides=run)
            except (ConfigCompositionException, OmegaConfBaseException) as err:
                raise composition_error(err) from None
        for key in ranged:
            if OmegaConf.select(cfg, key, default=MISSING_KEY) is MISSING_KEY:
                raise unknown_key(key)


def completion_words() -> list[str]:
    """Every word a Tab may complete to: each key as `key=`, each option of each config group as
    `group=option` (`+group=option` for a group outside train.yaml's defaults), Hydra's flags."""

    def keys(node: dict, prefix: str) -> list[str]:
        found = []
        for key, value in node.items():
            if isinstance(value, dict) and value:
                found += keys(value, f"{prefix}{key}.")
            elif not isinstance(value, dict):
                found.append(f"{prefix}{key}=")
        return found

    words = keys(OmegaConf.to_container(schema()), "")
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    chosen = {next(iter(d)) for d in defaults if isinstance(d, DictConfig)}
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        plus = "" if group.name in chosen else "+"
        words += [f"{plus}{group.name}={f.stem}" for f in sorted(group.glob("*.yaml"))]
    return words + ["--help", "--hydra-help", "--cfg", "--multirun", "--config-dir", "--info"]


def flags_first(argv: list[str]) -> list[str]:
    """The command line with Hydra's flags before its overrides: Hydra takes the overrides in
    one run, so `+experiment=char_lm -m optim.lr=1e-3,3e-3` was 'unrecognized arguments' and a
    usage text."""
    overrides = parse_args(argv, intermixed=True).overrides
    flags = list(argv)
    for override in overrides:
        flags.remove(override)
    return [*flags, *overrides]


def main() -> None:
    """Check the command line in one line per error, then hand it to Hydra. Help, shell
    completion and --info go to Hydra unchecked: they compose nothing. A completion query
    leaves the words in completion's cache, so the next Tab needs no import of torch."""
    sys.argv[1:] = flags_first(sys.argv[1:])
    args = parse_args()
    if completion.query(sys.argv[1:]):
        completion.write(completion_words())
    if not (args.help or args.hydra_help or args.shell_completion or args.info):
        try:
            check_command_line(args)
        except ConfigError as err:
            fail(str(err))
    hydra_main()
    if FAILED_JOBS:  # a sweep that went on past failed jobs: its status counts them
        print(
            f"seqtrain: error: {len(FAILED_JOBS)} sweep job(s) failed: "
            f"{' '.join(map(str, FAILED_JOBS))} (each folder's error.txt says why)",
            file=sys.stderr,
        )
        sys.exit(min(len(FAILED_JOBS), 125))
