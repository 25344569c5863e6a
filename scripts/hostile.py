"""The hostile table (issue #24): what a new or hostile user does through the real command line,
each case with the outcome it must have, run and classified.

Every case is one process (`python -m seqtrain ...`, `python -m seqtrain.sample`, `.evaluate`,
`.report`, `.recall`) on a tiny run (`+debug=tiny`), in its own folder under one temporary
folder of the script's run; shared fixtures (a corpus, a finished tiny run to resume, the
plug-ins a hostile user writes) are made there once, when a case first needs them.

A case expects one of:

    refused       exit 2 (or the status it names), exactly one `seqtrain: error:` line that
                  holds the case's words (a key or a file), no traceback
    warned        exit 0, a WARNING line that holds the words; a check verifies what else the
                  issue asks (the warning in summary.json)
    correct       exit 0, and a check verifies the result (a figure equal to a reference, a
                  cache rebuilt, a summary kept)
    plugin-frame  the user's plug-in raised: a non-zero exit, its frame (file) and the key that
                  named it shown; a traceback is allowed

What happened is one verdict: ok, silently wrong (exit 0 where a refusal or warning was due, or a
checked figure is wrong), traceback (one the case does not allow), hang (no exit within its
time), data loss (a file of a run folder that existed before changed or vanished: every such
folder is hashed before and after), wrong message (refused, but not in one line, not naming the
words, or another exit status). `setup failed`: a run the case starts from (a
fixture, a first run) failed. `skipped`: a case this machine cannot set up (a tmpfs).

    python scripts/hostile.py                   # the whole table, one case at a time
    python scripts/hostile.py -j 2 --only resume
    python scripts/hostile.py --smoke           # a handful of cases (tests/test_hostile.py)
    python scripts/hostile.py --write docs/hostile.md

Exits 1 when a case has a verdict other than ok (or skipped).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
TINY = ("+debug=tiny", "trainer.sample_length=0")
TOOLS = {
    "seqtrain": ("-m", "seqtrain"),
    "sample": ("-m", "seqtrain.sample"),
    "evaluate": ("-m", "seqtrain.evaluate"),
    "report": ("-m", "seqtrain.report"),
    "recall": ("-m", "seqtrain.recall"),
}
ERROR_LINE = re.compile(r"^seqtrain(\.\w+)?: error: ")
TRACEBACK = "Traceback (most recent call last)"
EXPECTS = ("refused", "warned", "correct", "plugin-frame")
VERDICTS = (
    "ok",
    "silently wrong",
    "traceback",
    "hang",
    "data loss",
    "wrong message",
    "setup failed",
    "skipped",
)
# Permissions mean nothing to root: such cases run without the capabilities that bypass them.
UNPRIVILEGED = (
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
)
# --smoke: a refusal of Hydra composition, of validation and of the data; the report tool
SMOKE = ("config typo", "window zero", "missing corpus", "report of a missing folder")


DEFAULT = -1000  # Case.status: 2 for a refusal, 0 for the others


class Skip(Exception):
    """The machine cannot set the case up (no tmpfs, no unprivileged user)."""


@dataclass
class Result:
    """What one case's process did."""

    case: Case
    d: Path  # the case's folder
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    hung: bool = False
    verdict: str = ""
    note: str = ""
    run: Path = Path()  # the run folder: hydra.run.dir as given, else CASE/run
    env: dict = field(default_factory=dict)
    paths: Paths | None = None

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> dict:
        return json.loads((self.run / "summary.json").read_text())


Check = Callable[[Result], "str | None"]  # what is wrong with the result, or None


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # one of EXPECTS
    args: tuple[str, ...] = ()  # str.format'ed with the case's paths (Paths)
    words: str = ""  # what the error or WARNING line (plugin-frame: the output) must hold
    tool: str = "seqtrain"
    setup: Callable[[Fixtures, Path], None] | None = None  # fills the case folder first
    check: Check | None = None
    tiny: bool = True  # seqtrain: +debug=tiny (hydra.run.dir=CASE/run unless the args set one)
    status: int | None = DEFAULT  # the exit status: refused 2, else 0; None: any non-zero
    send: tuple[int, str | float] | None = None  # a signal, when CASE/mark exists or after s
    env: tuple[tuple[str, str], ...] = ()
    unprivileged: bool = False  # permissions apply (as root: UNPRIVILEGED)
    frame: str = ""  # plugin-frame: the plug-in's file the output must show
    keep: tuple[str, ...] = ()  # run folder files that must stay as they were, whatever happens
    own_folder: bool = False  # the run folder exists before but is the run's own: it may write
    timeout: float = 240.0


# --- fixtures, made once per script run, when a case first asks


HOSTILE_PLUGINS = '''
"""Plug-ins as a hostile or careless user writes them (scripts/hostile.py)."""
import os
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
from torch import nn

from seqtrain.data import Corpus


def raising(path, cfg, budget):
    """A reader with a bug in it."""
    raise ValueError("the reader's own bug")


def text(path, cfg, budget):
    """A reader that works: the file's bytes."""
    values = np.frombuffer(path.read_bytes()[:budget], dtype=np.uint8)
    return Corpus(values, np.zeros(1, np.int64), path.name)


class Mark(L.Callback):
    """Touches `path` after the first update and sleeps `sleep` s after each: a signal lands
    inside training."""

    def __init__(self, path, sleep=0.0):
        self.path, self.sleep = Path(path), sleep

    def on_train_batch_end(self, trainer, *args):
        self.path.touch()
        time.sleep(self.sleep)


class KillRank(L.Callback):
    """SIGKILLs rank `rank` at update `at_step`: a peer dying under DDP."""

    def __init__(self, rank, at_step):
        self.rank, self.at_step = rank, at_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_rank == self.rank and trainer.global_step >= self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


class NotACallback:
    """Named as a callback, but not a Lightning Callback."""


class WideCell(nn.Module):
    """Returns one unit more than its hidden size."""

    num_states = 1

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih = nn.Linear(input_size, hidden_size + 1)

    def forward(self, x, state):
        h = self.ih(x)
        return h, (h,)


class RaisingCell(nn.Module):
    """A cell whose forward has a bug."""

    num_states = 1

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih = nn.Linear(input_size, hidden_size)

    def forward(self, x, state):
        raise RuntimeError("the cell's own bug")


class NotATask:
    """Named as task.name, but not a Task."""

    def __init__(self, *args, **kwargs):
        pass
'''

FIXABLE_TOKENIZER = """
import numpy as np
from seqtrain.tokenizers import Tokenizer


def shift(ids):
    return ids  # BUG


class Tok(Tokenizer):
    vocab_size = 256

    @classmethod
    def fit(cls, texts, cfg):
        return cls()

    @classmethod
    def from_state(cls, state):
        return cls()

    def state(self):
        return {}

    def encode(self, text):
        return shift(np.frombuffer(text, dtype=np.uint8))

    def decode(self, ids):
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")
"""

WORDS = [a + b for a in ("ka", "lo", "mi", "su", "te", "ran", "vo", "ple") for b in "aeiouxyz"]


def lines_of_words(count: int, seed: int = 0) -> str:
    r = random.Random(seed)
    return "".join(
        " ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) + "\n" for _ in range(count)
    )


class Fixtures:
    """The script run's temporary folder and what several cases share, each made once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()  # a fixture may use another
        self.made: dict[str, Path | Exception] = {}
        self.env = base_env(self)
        (root / "fixtures" / "plugins").mkdir(parents=True)
        (root / "fixtures" / "plugins" / "hostile_plugins.py").write_text(HOSTILE_PLUGINS)

    def once(self, name: str, make: Callable[[Path], None]) -> Path:
        with self.lock:
            if name not in self.made:
                path = self.root / "fixtures" / name
                try:
                    make(path)
                    self.made[name] = path
                except Exception as err:  # made once: the cases that need it say so
                    self.made[name] = err
            made = self.made[name]
            if isinstance(made, Exception):
                raise made
            return made

    @property
    def text(self) -> Path:
        """60 KB of lines of words: text for the byte and the word tokenizer."""
        return self.once("corpus.txt", lambda p: p.write_text(lines_of_words(1500)))

    @property
    def trained(self) -> Path:
        """A finished tiny byte-LM run (the stdlib corpus): checkpoints, summary, cli.log."""
        return self.once("trained", lambda p: train(self, p))

    @property
    def ckpt(self) -> Path:
        return self.trained / "checkpoints" / "last.ckpt"

    @property
    def word_trained(self) -> Path:
        """A finished tiny word-level run on `text`, its token cache in word_cache."""

        def make(p: Path) -> None:
            train(self, p, f"data.path={self.text}", "data.tokenizer=word", self.word_cache_arg)

        return self.once("word_trained", make)

    @property
    def word_cache_arg(self) -> str:
        return f"data.cache_dir={self.root / 'fixtures' / 'word_cache'}"


def base_env(fx: Fixtures) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LOCAL_RANK")}
    paths = [str(ROOT), str(PLUGINS), str(fx.root / "fixtures" / "plugins")]
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths), PYTHONWARNINGS="ignore")
    return env


def train(fx: Fixtures, run_dir: Path, *args: str, env: dict | None = None) -> None:
    """A tiny run that must succeed (a fixture, or a case's first run)."""
    argv = [sys.executable, "-m", "seqtrain", *TINY, *args, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(argv, env=env or fx.env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fixture run {' '.join(argv)} failed:\n{done.stderr[-3000:]}")


class Paths:
    """The names a case's arguments use: {d} its folder, {run} its run folder, {ckpt} the
    finished run's last.ckpt, {trained} that run's folder, {text} the word corpus."""

    def __init__(self, fx: Fixtures, d: Path) -> None:
        self.fx, self.d = fx, d

    def __getitem__(self, key: str) -> str:
        if key == "d":
            return str(self.d)
        if key == "run":
            return str(self.d / "run")
        if key == "word_ckpt":
            return str(self.fx.word_trained / "checkpoints" / "last.ckpt")
        if key == "word_cache":
            return self.fx.word_cache_arg
        return str(getattr(self.fx, key))


# --- setups: small helpers a case combines


def files(**content: bytes | str) -> Callable[[Fixtures, Path], None]:
    """Files in the case folder (names with / make folders; '__' in a name stands for '.')."""

    def setup(fx: Fixtures, d: Path) -> None:
        for name, data in content.items():
            path = d / name.replace("__", ".")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def steps(*setups: Callable[[Fixtures, Path], None]) -> Callable[[Fixtures, Path], None]:
    def setup(fx: Fixtures, d: Path) -> None:
        for one in setups:
            one(fx, d)

    return setup


def npy(name: str, array: np.ndarray) -> Callable[[Fixtures, Path], None]:
    return lambda fx, d: np.save(d / name, array)


def binary(name: str, array: np.ndarray) -> Callable[[Fixtures, Path], None]:
    return lambda fx, d: array.tofile(d / name)


def text_in(folder: str, *names: str) -> Callable[[Fixtures, Path], None]:
    """A corpus folder of copies of the word corpus."""

    def setup(fx: Fixtures, d: Path) -> None:
        for name in names:
            (d / folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(fx.text, d / folder / name)

    return setup


def fifo(name: str) -> Callable[[Fixtures, Path], None]:
    def setup(fx: Fixtures, d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(d / name)

    return setup


def unix_socket(name: str) -> Callable[[Fixtures, Path], None]:
    def setup(fx: Fixtures, d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(d / name))
        sock.close()

    return setup


def link(name: str, target: str) -> Callable[[Fixtures, Path], None]:
    """A symlink; a target starting with '/' is absolute, else relative to the case folder."""

    def setup(fx: Fixtures, d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).symlink_to(target if target.startswith("/") else d / target)

    return setup


def chmod(name: str, mode: int) -> Callable[[Fixtures, Path], None]:
    return lambda fx, d: (d / name).chmod(mode)


def holds_trained(fx: Fixtures, d: Path) -> None:
    """The case's run folder holds a copy of the finished run (checkpoints, summary, cli.log)."""
    shutil.copytree(fx.trained, d / "run", symlinks=True)


def cut_last(fx: Fixtures, d: Path) -> None:
    holds_trained(fx, d)
    last = d / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])


def only_best(fx: Fixtures, d: Path) -> None:
    holds_trained(fx, d)
    (d / "run" / "checkpoints" / "last.ckpt").unlink()
    (d / "run" / "summary.json").unlink()


def no_summary(fx: Fixtures, d: Path) -> None:
    """Stopped at the last step: last.ckpt at trainer.max_steps, no summary.json."""
    holds_trained(fx, d)
    (d / "run" / "summary.json").unlink()


def lock(text: str, age_h: float = 0.0) -> Callable[[Fixtures, Path], None]:
    def setup(fx: Fixtures, d: Path) -> None:
        (d / "run").mkdir(exist_ok=True)
        path = d / "run" / ".seqtrain.lock"
        path.write_text(text.format(host=socket.gethostname()) + "\n")
        then = time.time() - age_h * 3600
        os.utime(path, (then, then))

    return setup


def dead_pid() -> int:
    """A pid no process has now (a child that has exited)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def edited(edit: Callable[[dict], None], name: str = "edited.ckpt"):
    """A copy of the finished run's checkpoint, edited."""

    def setup(fx: Fixtures, d: Path) -> None:
        import torch

        ckpt = torch.load(fx.ckpt, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, d / name)

    return setup


def tmpfs(name: str, size: str, fill_kib: int) -> Callable[[Fixtures, Path], None]:
    """A small tmpfs at CASE/name, filled but for a little: a disk that fills up mid-run."""

    def setup(fx: Fixtures, d: Path) -> None:
        (d / name).mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d / name)],
            capture_output=True,
        )
        if done.returncode != 0:
            raise Skip("cannot mount a tmpfs here")
        (d / name / ".filler").write_bytes(bytes(fill_kib * 1024))

    return setup


# --- checks


def no_temp_files(folder: str) -> Check:
    def check(r: Result) -> str | None:
        left = [p.name for p in (r.d / folder).rglob("*.tmp")] if (r.d / folder).exists() else []
        return f"temporary files left: {left}" if left else None

    return check


def no_lock(r: Result) -> str | None:
    return ".seqtrain.lock left behind" if (r.run / ".seqtrain.lock").exists() else None


def all_of(*checks: Check) -> Check:
    def check(r: Result) -> str | None:
        return next((p for p in (c(r) for c in checks) if p), None)

    return check


def trained_ok(r: Result) -> str | None:
    """A finished tiny run: 6 updates, a finite val figure, its checkpoints."""
    if not (r.run / "summary.json").is_file():
        return "no summary.json"
    s = r.summary()
    figure = s.get(s.get("monitor", "val/bpc").replace("/", "_"))
    if s.get("steps") != 6 or figure is None or not math.isfinite(figure):
        return f"summary: steps {s.get('steps')}, figure {figure}"
    if not (r.run / "checkpoints" / "last.ckpt").is_file():
        return "no checkpoints/last.ckpt"
    return None


def same_figure_as_first(r: Result) -> str | None:
    """The run's val_bpc equals the reference run's (same seed, config and data)."""
    problem = trained_ok(r)
    if problem:
        return problem
    ours, first = r.summary()["val_bpc"], json.loads((r.d / "first" / "summary.json").read_text())
    if abs(ours - first["val_bpc"]) > 1e-6:
        return f"val_bpc {ours:.4f}, the reference run's {first['val_bpc']:.4f}"
    return None


def marked(words: str) -> Check:
    """summary.json lists the warning in data_warnings."""

    def check(r: Result) -> str | None:
        problem = trained_ok(r)
        if problem:
            return problem
        found = r.summary().get("data_warnings") or []
        return None if any(words in w for w in found) else f"data_warnings: {found}"

    return check


def says(words: str) -> Check:
    return lambda r: None if words in r.text else f"the output lacks {words!r}"


def lacks(words: str) -> Check:
    return lambda r: f"the output says {words!r}" if words in r.text else None


def no_warning(r: Result) -> str | None:
    problem = trained_ok(r)
    if problem:
        return problem
    found = r.summary().get("data_warnings")
    return f"data_warnings: {found}" if found else None


def evaluates_to_trained(r: Result) -> str | None:
    """evaluate split=val gives the figure the finished run's summary holds."""
    summary = json.loads((Path(r.paths["trained"]) / "summary.json").read_text())
    got = json.loads(r.stdout.strip().splitlines()[-1])
    figure = next((v for k, v in got.items() if k.endswith("bpc")), None)
    if figure is None or abs(figure - summary["val_bpc"]) > 1e-4:
        return f"evaluate gave {got}, the run's summary val_bpc {summary['val_bpc']:.4f}"
    return None


def resume_command_works(r: Result) -> str | None:
    """The printed `resume with:` command, run as printed (through a shell), finishes the run."""
    line = next((x for x in r.text.splitlines() if x.startswith("resume with: ")), None)
    if line is None:
        return "no 'resume with:' line"
    command = line.removeprefix("resume with: ").replace("python -m", f"{sys.executable} -m", 1)
    done = subprocess.run(
        command, shell=True, env=r.env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        return f"the resume command failed ({done.returncode}): {done.stderr.strip()[-300:]}"
    return trained_ok(r)


def finished_after_resume(r: Result) -> str | None:
    problem = trained_ok(r)
    if problem:
        return problem
    s = r.summary()
    if s.get("tokens_per_s") == 0 or "(0 tokens/s)" in r.text:
        return f"invented throughput: tokens_per_s {s.get('tokens_per_s')}"
    if s.get("tokens_per_s") is None and not s.get("figures_note"):
        return "tokens_per_s null without a figures_note"
    return None


def summary_kept(r: Result) -> str | None:
    before = (Path(r.paths["trained"]) / "summary.json").read_bytes()
    return None if (r.run / "summary.json").read_bytes() == before else "summary.json changed"


def sweep_failure_reported(r: Result) -> str | None:
    """The crashed job has its error.txt; the report lists it as failed under its overrides."""
    sweep = r.d / "sweep"
    error = sweep / "0" / "error.txt"
    if not error.is_file():
        return "job 0 has no error.txt"
    if "ValueError" not in error.read_text():
        return f"error.txt: {error.read_text()!r}"
    done = subprocess.run(
        [sys.executable, "-m", "seqtrain.report", str(sweep)],
        env=r.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"seqtrain.report failed: {done.stderr.strip()[-300:]}"
    report = (sweep / "report.md").read_text() if (sweep / "report.md").exists() else done.stdout
    if "failed" not in report or "raising" not in report:
        return "the report does not list the crashed job (data.reader=...raising) as failed"
    return None


def sample_text(r: Result) -> str | None:
    return None if len(r.stdout.strip()) > 0 else "no text sampled"


# --- the table

RESUME = "resume=auto"


def refused(name: str, *args: str, words: str, **kw) -> Case:
    return Case(name, "refused", args, words, **kw)


def correct(name: str, *args: str, check: Check, **kw) -> Case:
    return Case(name, "correct", args, check=check, **kw)


def warned(name: str, *args: str, words: str, **kw) -> Case:
    return Case(name, "warned", args, words, **kw)


def _vocab_100(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["spec"]["input_size"] = 100


def _other_corpus(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["spec"]["corpus"] = "sha256:" + "0" * 64


def _moved_corpus(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["config"]["data"]["path"] = "/no/such/moved.txt"


def _nan_weights(ckpt: dict) -> None:
    ckpt["state_dict"]["model.head.weight"].fill_(float("nan"))


def _no_config(ckpt: dict) -> None:
    del ckpt["hyper_parameters"]


def _no_optimizer(ckpt: dict) -> None:
    del ckpt["optimizer_states"]


def _no_weights(ckpt: dict) -> None:
    del ckpt["state_dict"]


def three_tokens() -> bytes:
    """A valid tokenizer.json (the tokenizers library's) of a 3-token vocabulary."""
    from tokenizers import Tokenizer, models

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    return Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).to_str().encode()


def zero_word_cache(fx: Fixtures, d: Path) -> None:
    """Train once on the word tokenizer (CASE/first), then zero the token cache's .bin."""
    cache = f"data.cache_dir={d / 'cache'}"
    train(fx, d / "first", f"data.path={fx.text}", "data.tokenizer=word", cache)
    for path in (d / "cache" / "tokens").glob("*.bin"):
        path.write_bytes(bytes(path.stat().st_size))


def fixable_plugin(fx: Fixtures, d: Path) -> None:
    """A tokenizer plug-in with a bug trains once; then its encode is fixed (in a helper)."""
    (d / "plug").mkdir()
    module = d / "plug" / "fixme_tok.py"
    module.write_text(FIXABLE_TOKENIZER.replace("  # BUG", " // 2"))
    env = {**fx.env, "PYTHONPATH": f"{d / 'plug'}{os.pathsep}{fx.env['PYTHONPATH']}"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    train(fx, d / "first", *FIX_ARGS_OF(d), env=env)
    module.write_text(FIXABLE_TOKENIZER.replace("  # BUG", ""))


def FIX_ARGS_OF(d: Path) -> tuple[str, ...]:  # noqa: N802 (the args both runs share)
    return ("data.tokenizer=fixme_tok:Tok", f"data.cache_dir={d / 'cache'}", f"data.path={d}/c")


def edit_fitted(fx: Fixtures, d: Path) -> None:
    cache = f"data.cache_dir={d / 'cache'}"
    train(fx, d / "first", f"data.path={fx.text}", "data.tokenizer=word", cache)
    (fitted,) = (d / "cache" / "tokens").glob("tokenizer-*.json")
    fitted.write_text(fitted.read_text().replace('"<eos>"', '"<EOS>"'))


def killed_mid_training(fx: Fixtures, d: Path) -> None:
    """A run SIGKILLed after its first update (sleeping 0.5 s per update)."""
    argv = [sys.executable, "-m", "seqtrain", *TINY, f"hydra.run.dir={d / 'run'}"]
    argv += ["trainer.checkpoint_every=1", *MARK_ARGS(d, 0.5)]
    child = subprocess.Popen(
        argv, env=fx.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(d / "mark", 180)
    time.sleep(1.2)
    child.kill()
    child.wait()
    (d / "mark").unlink(missing_ok=True)


def MARK_ARGS(d: Path | str, sleep: float) -> tuple[str, ...]:  # noqa: N802
    return (
        "+callbacks.mark._target_=hostile_plugins.Mark",
        f"+callbacks.mark.path={d}/mark",
        f"+callbacks.mark.sleep={sleep}",
    )


def wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


WORD_TEXT = ("data.path={text}", "data.tokenizer=word")
TOK_BIN = ("data.path={d}/t.bin", "data.vocab_size=256")
IDS_U16 = np.random.default_rng(0).integers(1, 200, 40_000).astype(np.uint16)
TEXT_U8 = np.frombuffer(lines_of_words(3000, seed=3).encode()[:90_000], dtype=np.uint8)  # even
SERIES = ("task=regression", "data.source=series")
WAVE = np.sin(np.arange(4000, dtype=np.float32) / 7)[:, None].repeat(2, 1)
SLOW = ("data.tokenizer=bad_tokenizers:Slow", "data.path={text}", "data.cache_dir={d}/cache")


def config_cases() -> list[Case]:
    """Keys and values: typos, impossible values and combinations (no fixture needed)."""
    r = refused
    return [
        r("config typo", "model.hiden_size=3", words="model.hiden_size is not a key"),
        r("config typo in a group key", "optim.lrr=1", words="optim.lrr"),
        r("config new top-level key", "+learning_rate=1", words="learning_rate"),
        r("unknown group option", "data=wiki", words="data=wiki: no such option"),
        r("unknown model option", "model=transformer", words="model=transformer"),
        r("unknown task option", "task=nope", words="task=nope"),
        r("unknown logger option", "logger=wandb", words="logger=wandb"),
        r("experiment without +", "experiment=char_lm", words="+experiment=char_lm"),
        r("unknown experiment", "+experiment=gpt5", words="experiment=gpt5"),
        r("debug without +", "debug=tiny", words="+debug=tiny", tiny=False),
        r("override syntax error", "model.hidden_size=[1", words="override syntax"),
        r("config dir missing", "--config-dir", "/no/such/conf", words="--config-dir"),
        r("unknown backend", "model.backend=cuda", words="model.backend=cuda"),
        r("unknown cell", "model.cell=rnn", words="model.cell=rnn"),
        r(
            "a CUDA-only backend on a CPU",
            "model.cell=gdn",
            "model.backend=fla",
            words="model.backend=fla runs model.cell=gdn on cuda only",
        ),
        r("cell plug-in not importable", "model.cell=no_such_mod:Cell", words="model.cell"),
        r("window zero", "tbptt.window=0", words="tbptt.window=0"),
        r("window negative", "tbptt.window=-3", words="tbptt.window=-3"),
        r("window text", "tbptt.window=long", words="tbptt.window"),
        r("stride above window", "tbptt.stride=17", words="tbptt.stride=17"),
        r("stride zero", "tbptt.stride=0", words="tbptt.stride=0"),
        r(
            "varied windows with a stride",
            "tbptt.vary=true",
            "tbptt.stride=8",
            words="tbptt.stride=8",
        ),
        r("varied windows too short", "tbptt.vary=true", "tbptt.window=8", words="tbptt.window=8"),
        r("batch size zero", "data.batch_size=0", words="data.batch_size=0"),
        r("batch size negative", "data.batch_size=-1", words="data.batch_size=-1"),
        r("eval batch size zero", "data.eval_batch_size=0", words="data.eval_batch_size=0"),
        r("learning rate negative", "optim.lr=-1", words="optim.lr=-1"),
        r("learning rate zero", "optim.lr=0", words="optim.lr=0"),
        r("learning rate NaN", "optim.lr=nan", words="optim.lr=nan"),
        r("learning rate infinite", "optim.lr=inf", words="optim.lr=inf"),
        r("weight decay negative", "optim.weight_decay=-1", words="optim.weight_decay"),
        r("grad clip infinite", "optim.grad_clip=inf", words="optim.grad_clip=inf"),
        r("max_skipped zero", "optim.max_skipped=0", words="optim.max_skipped=0"),
        r("nonmono zero", "optim=ntasgd", "optim.nonmono=0", words="optim.nonmono=0"),
        r("unknown averaging rule", "optim.average=swa", words="optim.average=swa"),
        r(
            "optimizer target misspelt",
            "optim.optimizer._target_=torch.optim.AdamWW",
            words="optim.optimizer._target_",
        ),
        r(
            "optimizer argument it does not take",
            "+optim.optimizer.momentum=0.9",
            words="optim.optimizer.momentum",
        ),
        r(
            "optimizer target not an optimizer",
            "optim.optimizer._target_=torch.nn.Linear",
            words="torch.nn.Linear takes no such argument",  # betas, AdamW's, found first
        ),
        r(
            "optimizer beta out of range",
            "optim.optimizer.betas=[2.0,0.9]",
            words="optim.optimizer.betas",
        ),
        r(
            "optimizer eps negative",
            "+optim.optimizer.eps=-1",
            words="optim.optimizer.eps",
        ),
        r("AR negative", "model.ar=-1", words="model.ar=-1"),
        r("TAR infinite", "model.tar=inf", words="model.tar=inf"),
        r("dropout 1.5", "model.dropout=1.5", words="model.dropout=1.5"),
        r("dropout negative", "model.dropout=-0.1", words="model.dropout=-0.1"),
        r("forget bias NaN", "model.forget_bias=nan", words="model.forget_bias=nan"),
        r("hidden size text", "model.hidden_size=big", words="model.hidden_size"),
        r("hidden size zero", "model.hidden_size=0", words="model.hidden_size=0"),
        r("layers zero", "model.num_layers=0", words="model.num_layers=0"),
        r("embedding size zero", "model.embedding_size=0", words="model.embedding_size=0"),
        r(
            "hidden_size=100000 (a 160 GB model)",
            "model.hidden_size=100000",
            words="model.hidden_size=100000",
        ),
        r(
            "layers 5000 of 4096 (too large)",
            "model.hidden_size=4096",
            "model.num_layers=5000",
            words="model.num_layers",
        ),
        r("tied head of another size", "model.tie_weights=true", words="model.tie_weights"),
        r("unknown head", "model.head=softmax", words="model.head=softmax"),
        r("adaptive head without cutoffs", "model.head=adaptive", words="model.cutoffs"),
        r(
            "cutoffs not increasing",
            "model.head=adaptive",
            "model.cutoffs=[100,50]",
            words="model.cutoffs",
        ),
        r("split of two", "data.split=[0.9,0.1]", words="data.split"),
        r("split with inf", "data.split=[inf,0.05,0.05]", words="data.split"),
        r("split with a zero val", "data.split=[1.0,0.0,0.0]", words="data.split"),
        r("split over one", "data.split=[0.8,0.5,0.5]", words="data.split"),
        r("max_bytes zero", "data.max_bytes=0", words="data.max_bytes"),
        r("max_bytes negative", "data.max_bytes=-5", words="data.max_bytes"),
        r("unknown data source", "data.source=wiki", words="data.source=wiki"),
        r("unknown token dtype", "data.dtype=float32", words="data.dtype=float32"),
        r("unknown reader", "data.reader=parquet", words="data.reader=parquet"),
        r("unknown tokenizer", "data.tokenizer=wordpiece", words="data.tokenizer=wordpiece"),
        r(
            "tokenizer plug-in not importable",
            "data.tokenizer=no_such_module:Tok",
            words="data.tokenizer=no_such_module:Tok",
        ),
        r(
            "word vocabulary of 2",
            "data.tokenizer=word",
            "data.vocab_size=2",
            words="data.vocab_size=2",
        ),
        r(
            "bpe vocabulary below 256",
            "data.tokenizer=bpe",
            "data.vocab_size=100",
            words="data.vocab_size=100",
        ),
        r("bpe without a vocabulary size", "data.tokenizer=bpe", words="data.vocab_size"),
        r("min_count zero", "data.tokenizer=word", "data.min_count=0", words="data.min_count=0"),
        r("tokenizer key bytes do not read", "data.min_count=5", words="data.min_count=5"),
        r("vocabulary size for byte text", "data.vocab_size=100", words="data.vocab_size=100"),
        r(
            "tokenizer on a series",
            "data.source=mackey_glass",
            "data.length=200",
            "data.tokenizer=word",
            words="data.tokenizer=word",
        ),
        r("task and data disagree", "task=regression", words="task.name=regression"),
        r(
            "task plug-in not a task",
            "task.name=hostile_plugins:NotATask",
            words="task.name",
        ),
        r("max_steps zero", "trainer.max_steps=0", words="trainer.max_steps=0"),
        r(
            "max_steps -1 (Lightning's forever)",
            "trainer.max_steps=-1",
            words="trainer.max_steps=-1",
            timeout=150,
        ),
        r(
            "val_check_interval zero",
            "trainer.val_check_interval=0",
            words="trainer.val_check_interval",
        ),
        r(
            "checkpoint_every zero",
            "trainer.checkpoint_every=0",
            words="trainer.checkpoint_every=0",
        ),
        r("sample length negative", "trainer.sample_length=-1", words="trainer.sample_length"),
        r("devices zero", "trainer.devices=0", words="trainer.devices=0"),
        r("unknown precision", "trainer.precision=16", words="trainer.precision=16"),
        r("spawn strategy", "trainer.strategy=ddp_spawn", words="trainer.strategy=ddp_spawn"),
        r(
            "accelerator gpu on a CPU machine",
            "trainer.accelerator=gpu",
            words="trainer.accelerator=gpu",
        ),
        r("unknown accelerator", "trainer.accelerator=tpu", words="trainer.accelerator=tpu"),
        r("nodes without a cluster", "trainer.num_nodes=2", words="trainer.num_nodes=2"),
        r("DDP wait zero", "trainer.ddp_timeout=0", words="trainer.ddp_timeout"),
        r("DDP wait infinite", "trainer.ddp_timeout=inf", words="trainer.ddp_timeout"),
        r(
            "+trainer.limit_val_batches=0",
            "+trainer.limit_val_batches=0",
            words="trainer.limit_val_batches",
        ),
        r(
            "+trainer.limit_train_batches",
            "+trainer.limit_train_batches=2",
            words="trainer.limit_train_batches",
        ),
        r(
            "+trainer.overfit_batches",
            "+trainer.overfit_batches=1",
            words="trainer.overfit_batches",
        ),
        r("+trainer.fast_dev_run", "+trainer.fast_dev_run=true", words="trainer.fast_dev_run"),
        r(
            "+trainer.gradient_clip_val",
            "+trainer.gradient_clip_val=1",
            words="trainer.gradient_clip_val",
        ),
        r(
            "+trainer.accumulate_grad_batches",
            "+trainer.accumulate_grad_batches=2",
            words="trainer.accumulate_grad_batches",
        ),
        r("+trainer.max_epochs", "+trainer.max_epochs=1", words="trainer.max_epochs"),
        r("not a Trainer argument", "+trainer.clip=1", words="trainer.clip"),
        r("budget below the minimum", "memory.budget=1KB", words="memory.budget=1KB"),
        r("budget not a size", "memory.budget=lots", words="memory.budget=lots"),
        r("unknown checkpoint mode", "memory.checkpoint=all", words="memory.checkpoint=all"),
        r("seed negative", "seed=-1", words="seed=-1"),
        r("seed too large", "seed=4294967296", words="seed=4294967296"),
        r("unknown resume mode", "resume=yes", words="resume=yes"),
        r(
            "leftover LOCAL_RANK with devices=2",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            words="LOCAL_RANK",
            env=(("LOCAL_RANK", "1"),),
            status=None,
            timeout=120,
        ),
        r(
            "callback not a Callback",
            "+callbacks.x._target_=hostile_plugins.NotACallback",
            words="callbacks.x",
        ),
        r(
            "callback class missing",
            "+callbacks.x._target_=hostile_plugins.Nothing",
            words="callbacks.x",
        ),
        r(
            "cell plug-in of the wrong width",
            "model.backend=modular",
            "model.cell=hostile_plugins:WideCell",
            words="model.cell",
        ),
    ]


def corpus_cases() -> list[Case]:
    """What data.path names: missing, empty, special, unreadable, looping, junk."""
    r, big = refused, lines_of_words(1500)
    return [
        r("missing corpus", "data.path=/no/such.txt", words="data.path=/no/such.txt"),
        r("corpus path empty string", "data.path=''", words="data.path"),
        r(
            "empty corpus file",
            "data.path={d}/e.txt",
            words="the file is empty",
            setup=files(**{"e.txt": b""}),
        ),
        r(
            "empty directory as corpus",
            "data.path={d}/empty",
            words="holds no files",
            setup=lambda fx, d: (d / "empty").mkdir(),
        ),
        r(
            "directory of hidden files only",
            "data.path={d}/h",
            words="holds no files",
            setup=files(**{"h/__a.txt": big}),
        ),
        r(
            "directory of empty files",
            "data.path={d}/z",
            words="empty",
            setup=files(**{"z/a.txt": b"", "z/b.txt": b""}),
        ),
        r(
            "corpus too short for one window",
            "data.path={d}/s.txt",
            words="too few",
            setup=files(**{"s.txt": b"x" * 300}),
        ),
        correct(
            "binary junk as corpus",
            "data.path={d}/junk.bin.txt",
            check=trained_ok,
            setup=files(**{"junk.bin.txt": random.Random(1).randbytes(60_000)}),
        ),
        correct(
            "text not UTF-8",
            "data.path={d}/latin1.txt",
            check=trained_ok,
            setup=files(**{"latin1.txt": big.replace("ka", "\xe4").encode("latin-1")}),
        ),
        correct(
            "one line without a newline",
            "data.path={d}/line.txt",
            check=trained_ok,
            setup=files(**{"line.txt": big.replace("\n", " ")}),
        ),
        correct(
            "corpus path with spaces",
            "data.path='{d}/my corpus/c.txt'",
            check=trained_ok,
            setup=text_in("my corpus", "c.txt"),
        ),
        refused(  # Hydra's grammar has no unquoted ~ (a shell expands it before)
            "corpus path with ~", "data.path=~/c.txt", words="data.path=~/c.txt"
        ),
        correct(
            "corpus path with ~ quoted",
            "data.path='~/c.txt'",
            check=trained_ok,
            setup=text_in("home", "c.txt"),
            env=(("HOME", "{d}/home"),),
        ),
        correct(
            "corpus folder of text files",
            "data.path={d}/f",
            check=trained_ok,
            setup=text_in("f", "a.txt", "b/c.txt"),
        ),
        r(
            "FIFO as corpus",
            "data.path={d}/fifo",
            words="not a regular file",
            setup=fifo("fifo"),
            timeout=90,
        ),
        warned(
            "FIFO in a corpus folder",
            "data.path={d}/f",
            words="fifo: not regular files",
            check=marked("fifo: not regular files"),
            setup=steps(text_in("f", "a.txt"), fifo("f/fifo")),
            timeout=90,
        ),
        warned(
            "socket in a corpus folder",
            "data.path={d}/f",
            words="sock: not regular files",
            check=marked("sock: not regular files"),
            setup=steps(text_in("f", "a.txt"), unix_socket("f/sock")),
            timeout=90,
        ),
        r("device file as corpus", "data.path=/dev/zero", words="data.path=/dev/zero", timeout=90),
        warned(
            "link to a device in a corpus folder",
            "data.path={d}/f",
            words="zero: not regular files",
            check=marked("zero: not regular files"),
            setup=steps(text_in("f", "a.txt"), link("f/zero", "/dev/zero")),
            timeout=90,
        ),
        warned(
            "FIFO matched by a glob",
            "data.path={d}/g/*",
            words="fifo: not regular files",
            check=marked("fifo: not regular files"),
            setup=steps(text_in("g", "a.txt"), fifo("g/fifo")),
            timeout=90,
        ),
        r(
            "symlink loop as corpus",
            "data.path={d}/loop-a",
            words="symlink loop",
            setup=steps(link("loop-a", "loop-b"), link("loop-b", "loop-a")),
        ),
        r(
            "symlink loop in a corpus folder",
            "data.path={d}/f",
            words="loop",
            setup=steps(
                text_in("f", "a.txt"), link("f/loop-a", "f/loop-b"), link("f/loop-b", "f/loop-a")
            ),
        ),
        warned(
            "folder symlink loop in a corpus folder",
            "data.path={d}/f",
            words="symlinked folders are not followed",
            check=marked("f/b/up"),
            setup=steps(text_in("f", "a.txt", "b/c.txt"), link("f/b/up", "f")),
        ),
        warned(
            "symlinked folder in a corpus folder",
            "data.path={d}/f",
            words="symlinked folders are not followed",
            check=marked("a-linked"),
            setup=steps(
                text_in("f", "b.txt"),
                text_in("elsewhere", "c.txt"),
                link("f/a-linked", "elsewhere"),
            ),
        ),
        r(
            "dangling symlink in a corpus folder",
            "data.path={d}/f",
            words="gone",
            setup=steps(text_in("f", "a.txt"), link("f/gone", "no-such-file")),
        ),
        r(
            "unreadable corpus file",
            "data.path={d}/locked.txt",
            words="cannot read",
            setup=steps(text_in(".", "locked.txt"), chmod("locked.txt", 0)),
            unprivileged=True,
        ),
        r(
            "unreadable subfolder",
            "data.path={d}/f",
            words="cannot read",
            setup=steps(text_in("f", "a.txt", "b/c.txt"), chmod("f/b", 0)),
            unprivileged=True,
        ),
        r(
            "folder without search permission",
            "data.path={d}/f",
            words="cannot read",
            setup=steps(text_in("f", "a.txt", "b/c.txt"), chmod("f/b", 0o666)),
            unprivileged=True,
        ),
        r(
            "glob over an unreadable folder",
            "data.path={d}/f/*/*.txt",
            words="cannot read",
            setup=steps(text_in("f", "a/a.txt", "b/c.txt"), chmod("f/b", 0)),
            unprivileged=True,
        ),
        r("glob that matches nothing", "data.path={d}/*.nothing", words="matches no file"),
        r(
            "folder with a token array among text",
            "data.path={d}/f",
            words="token array",
            setup=steps(text_in("f", "a.txt"), binary("f/b.bin", IDS_U16)),
        ),
        r(
            "JSON Lines line that is not JSON",
            "data.path={d}/c.jsonl",
            words="line 2",
            setup=files(**{"c.jsonl": b'{"text": "a"}\n{oops}\n'}),
        ),
        r(
            "JSON Lines record without the field",
            "data.path={d}/c.jsonl",
            words="'text'",
            setup=files(**{"c.jsonl": b'{"body": "a"}\n'}),
        ),
        r(
            "JSON Lines record a list",
            "data.path={d}/c.jsonl",
            words="line 1",
            setup=files(**{"c.jsonl": b"[1, 2]\n"}),
        ),
        r(
            "JSON Lines text a number",
            "data.path={d}/c.jsonl",
            words="line 1",
            setup=files(**{"c.jsonl": b'{"text": 5}\n'}),
        ),
        r(
            "data.doc_starts_path with a text corpus",
            "data.path={text}",
            "data.doc_starts_path={d}/s.npy",
            words="data.doc_starts_path",
            setup=npy("s.npy", np.array([0, 5])),
        ),
        r(
            "data.target_path with a text corpus",
            "data.path={text}",
            "data.target_path={d}/y.npy",
            words="data.target_path",
            setup=npy("y.npy", np.zeros((10, 1), np.float32)),
        ),
        r(
            "unwritable token cache (a file)",
            *WORD_TEXT,
            "data.cache_dir={d}/afile",
            words="data.cache_dir",
            setup=files(afile=b"x"),
        ),
        r(
            "read-only token cache",
            *WORD_TEXT,
            "data.cache_dir={d}/ro",
            words="data.cache_dir",
            setup=steps(lambda fx, d: (d / "ro").mkdir(mode=0o555)),
            unprivileged=True,
        ),
    ]


def token_array_cases() -> list[Case]:
    r = refused
    u8_as_u16 = ("data.path={d}/t.bin", "data.dtype=uint16", "data.vocab_size=50257")
    return [
        r(
            "token array without vocab_size",
            "data.path={d}/t.bin",
            words="data.vocab_size",
            setup=binary("t.bin", IDS_U16),
        ),
        r(
            "token ids outside the vocabulary",
            "data.path={d}/t.bin",
            "data.vocab_size=100",
            words="outside data.vocab_size=100",
            setup=binary("t.bin", IDS_U16),
        ),
        r(
            "token file of an odd byte count",
            "data.path={d}/t.bin",
            "data.vocab_size=256",
            words="not a whole number",
            setup=files(**{"t.bin": bytes(2001)}),
        ),
        r(
            "token file empty",
            "data.path={d}/t.bin",
            "data.vocab_size=256",
            words="empty",
            setup=files(**{"t.bin": b""}),
        ),
        warned(
            "uint16 .bin read as uint8",
            "data.path={d}/t.bin",
            "data.dtype=uint8",
            "data.vocab_size=256",
            words="every second id is 0",
            setup=binary("t.bin", IDS_U16),
            check=marked("every second id is 0"),
        ),
        warned(
            "uint32 .bin read as uint16",
            "data.path={d}/t.bin",
            "data.dtype=uint16",
            "data.vocab_size=256",
            words="every second id is 0",
            setup=binary("t.bin", IDS_U16.astype(np.uint32)),
            check=marked("every second id is 0"),
        ),
        warned(
            "uint8 .bin read as uint16",
            *u8_as_u16,
            words="uint8 file read as",
            setup=binary("t.bin", TEXT_U8),
            check=marked("uint8 file read as"),
        ),
        r(
            "uint8 .bin read as uint16 (vocab 256)",
            "data.path={d}/t.bin",
            "data.dtype=uint16",
            "data.vocab_size=256",
            words="outside data.vocab_size=256",
            setup=binary("t.bin", TEXT_U8),
        ),
        r(
            "uint16 .bin read as uint32",
            "data.path={d}/t.bin",
            "data.dtype=uint32",
            "data.vocab_size=256",
            words="data.vocab_size=256",
            setup=binary("t.bin", IDS_U16),
        ),
        correct(
            "uint16 .bin read as uint16",
            "data.path={d}/t.bin",
            "data.dtype=uint16",
            "data.vocab_size=256",
            check=no_warning,
            setup=binary("t.bin", IDS_U16),
        ),
        correct(
            "uint8 .bin read as uint8",
            "data.path={d}/t.bin",
            "data.dtype=uint8",
            "data.vocab_size=256",
            check=no_warning,
            setup=binary("t.bin", TEXT_U8),
        ),
        correct(
            "uint16 .bin of a large vocabulary",
            "data.path={d}/t.bin",
            "data.dtype=uint16",
            "data.vocab_size=50257",
            check=no_warning,
            setup=binary("t.bin", ZIPF_IDS),
        ),
        r(
            ".npy of floats",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="float64",
            setup=npy("t.npy", np.ones(5000)),
        ),
        r(
            ".npy 2-D",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="shape",
            setup=npy("t.npy", np.ones((40, 2), np.int64)),
        ),
        r(
            ".npy of booleans",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="bool",
            setup=npy("t.npy", np.ones(5000, bool)),
        ),
        r(
            ".npy pickled objects",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="t.npy",
            setup=lambda fx, d: np.save(d / "t.npy", np.array([{}, []], object)),
        ),
        r(
            ".npy empty",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="empty",
            setup=npy("t.npy", np.zeros(0, np.int64)),
        ),
        r(
            ".npy negative ids",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="id -1",
            setup=npy("t.npy", np.concatenate([[-1], IDS_U16.astype(np.int64)])),
        ),
        r(
            ".npy truncated",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="t.npy",
            setup=steps(
                npy("t.npy", IDS_U16.astype(np.int64)),
                lambda fx, d: (d / "t.npy").write_bytes((d / "t.npy").read_bytes()[:999]),
            ),
        ),
        r(
            ".npy binary junk",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            words="t.npy",
            setup=files(**{"t.npy": random.Random(2).randbytes(5000)}),
        ),
        correct(
            ".npy of int32 ids",
            "data.path={d}/t.npy",
            "data.vocab_size=256",
            check=no_warning,
            setup=npy("t.npy", IDS_U16.astype(np.int32)),
        ),
        r(
            "doc_starts out of order",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.doc_starts_path={d}/s.npy",
            words="data.doc_starts_path",
            setup=steps(binary("t.bin", IDS_U16), npy("s.npy", np.array([0, 900, 300]))),
        ),
        r(
            "doc_starts negative",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.doc_starts_path={d}/s.npy",
            words="data.doc_starts_path",
            setup=steps(binary("t.bin", IDS_U16), npy("s.npy", np.array([0, -5]))),
        ),
        r(
            "doc_starts past the end",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.doc_starts_path={d}/s.npy",
            words="data.doc_starts_path",
            setup=steps(binary("t.bin", IDS_U16), npy("s.npy", np.array([0, 10**9]))),
        ),
        r(
            "doc_starts floats",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.doc_starts_path={d}/s.npy",
            words="data.doc_starts_path",
            setup=steps(binary("t.bin", IDS_U16), npy("s.npy", np.array([0.0, 5.5]))),
        ),
        correct(
            "doc_starts in order",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.doc_starts_path={d}/s.npy",
            check=trained_ok,
            setup=steps(binary("t.bin", IDS_U16), npy("s.npy", np.array([0, 300, 900]))),
        ),
        r(
            "data.target_path with a token array",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.target_path={d}/y.npy",
            words="data.target_path",
            setup=steps(binary("t.bin", IDS_U16), npy("y.npy", np.zeros((10, 1), np.float32))),
        ),
        r(
            "token array with a tokenizer",
            *TOK_BIN,
            "data.dtype=uint16",
            "data.tokenizer=word",
            words="data.tokenizer",
            setup=binary("t.bin", IDS_U16),
        ),
        r(
            "token array with text samples",
            *TOK_BIN,
            "data.dtype=uint16",
            "trainer.sample_length=20",
            words="tokenizer",
            setup=binary("t.bin", IDS_U16),
        ),
    ]


ZIPF_IDS = np.minimum(np.random.default_rng(4).zipf(1.3, 40_000), 50_256).astype(np.uint16)


def series_cases() -> list[Case]:
    r = refused
    return [
        r("series .npy missing", *SERIES, "data.path=/no/such.npy", words="data.path"),
        r(
            "series not 2-D",
            *SERIES,
            "data.path={d}/v.npy",
            words="shape",
            setup=npy("v.npy", np.ones(50, np.float32)),
        ),
        r(
            "series of integers",
            *SERIES,
            "data.path={d}/i.npy",
            words="int64",
            setup=npy("i.npy", np.ones((50, 2), np.int64)),
        ),
        r(
            "series with NaN",
            *SERIES,
            "data.path={d}/n.npy",
            words="NaN",
            setup=npy("n.npy", np.where(np.arange(8000).reshape(4000, 2) == 7, np.nan, WAVE)),
        ),
        r(
            "series of zero variance",
            *SERIES,
            "data.path={d}/flat.npy",
            words="zero variance",
            setup=npy("flat.npy", np.ones((4000, 2), np.float32)),
        ),
        r(
            "target column out of range",
            *SERIES,
            "data.path={d}/w.npy",
            "data.target_columns=[2]",
            words="data.target_columns",
            setup=npy("w.npy", WAVE),
        ),
        r(
            "target array of another length",
            *SERIES,
            "data.path={d}/w.npy",
            "data.target_path={d}/y.npy",
            words="data.target_path",
            setup=steps(npy("w.npy", WAVE), npy("y.npy", WAVE[:-1])),
        ),
        correct(
            "series that varies",
            *SERIES,
            "data.path={d}/w.npy",
            setup=npy("w.npy", WAVE),
            check=trained_ok,
        ),
    ]


def tokenizer_cases() -> list[Case]:
    r = refused
    bt = "data.tokenizer=bad_tokenizers:"
    return [
        correct(
            "zeroed token cache (train)",
            "data.path={text}",
            "data.tokenizer=word",
            "data.cache_dir={d}/cache",
            setup=zero_word_cache,
            check=all_of(same_figure_as_first, says("does not match its hash")),
        ),
        correct(
            "zeroed token cache (evaluate)",
            "ckpt={d}/first/checkpoints/last.ckpt",
            "split=val",
            tool="evaluate",
            setup=zero_word_cache,
            check=lambda r: figure_of_first(r),
        ),
        correct(
            "fixed tokenizer plug-in tokenizes anew",
            *FIX_ARGS_OF(Path("{d}")),
            setup=steps(text_in(".", "c"), fixable_plugin),
            env=(("PYTHONPATH", "{d}/plug:$PYTHONPATH"), ("PYTHONDONTWRITEBYTECODE", "1")),
            check=all_of(trained_ok, says("tokenized in"), lacks("from the cache")),
        ),
        correct(
            "edited fitted tokenizer is fitted again",
            "data.path={text}",
            "data.tokenizer=word",
            "data.cache_dir={d}/cache",
            setup=edit_fitted,
            check=all_of(same_figure_as_first, says("fitting again")),
        ),
        r(
            "plug-in ids above 255 (Wraps)",
            f"{bt}Wraps",
            "data.path={d}/euro.txt",
            "data.cache_dir={d}/c",
            words="encode gave id",
            setup=files(**{"euro.txt": "price € 5\n" * 4000}),
        ),
        r(
            "tokenizer plug-in giving floats",
            f"{bt}Floats",
            "data.path={text}",
            "data.cache_dir={d}/c",
            words="float32",
        ),
        r(
            "tokenizer plug-in state not JSON",
            f"{bt}Unsaveable",
            "data.path={text}",
            "data.cache_dir={d}/c",
            words="not JSON",
        ),
        r(
            "tokenizer plug-in without encode",
            f"{bt}NoEncode",
            "data.path={text}",
            words="lacks encode",
        ),
        r(
            "tokenizer plug-in a function",
            f"{bt}a_function",
            "data.path={text}",
            words="data.tokenizer",
        ),
        warned(
            "min_count=1000000 (2 tokens)",
            "data.path={text}",
            "data.tokenizer=word",
            "data.min_count=1000000",
            "data.cache_dir={d}/c",
            words="a vocabulary of 2",
            check=marked("a vocabulary of 2"),
        ),
        warned(
            "word vocabulary of 3",
            "data.path={text}",
            "data.tokenizer=word",
            "data.vocab_size=3",
            "data.cache_dir={d}/c",
            words="a vocabulary of 3",
            check=marked("a vocabulary of 3"),
        ),
        r(
            "3-token tokenizer.json as BPE",
            "data.path={text}",
            "data.tokenizer=bpe",
            "data.tokenizer_file={d}/tok3.json",
            words="holds 3 tokens",
            setup=lambda fx, d: (d / "tok3.json").write_bytes(three_tokens()),
        ),
        r(
            "not a tokenizer.json",
            "data.path={text}",
            "data.tokenizer=bpe",
            "data.tokenizer_file={d}/tok.json",
            words="data.tokenizer_file",
            setup=files(**{"tok.json": b'{"a": 1}'}),
        ),
        r(
            "tokenizer.json of junk",
            "data.path={text}",
            "data.tokenizer=bpe",
            "data.tokenizer_file={d}/tok.json",
            words="data.tokenizer_file",
            setup=files(**{"tok.json": random.Random(3).randbytes(500)}),
        ),
        r(
            "missing tokenizer file",
            "data.tokenizer=bpe",
            "data.tokenizer_file=/no/such.json",
            words="data.tokenizer_file=/no/such.json",
        ),
        r(
            "reader plug-in returning floats",
            "data.path={text}",
            "data.reader=bad_readers:floats",
            words="data.reader=bad_readers:floats",
        ),
        r(
            "reader plug-in returning a list",
            "data.path={text}",
            "data.reader=bad_readers:not_a_corpus",
            words="data.reader",
        ),
        r(
            "reader plug-in ids outside its vocabulary",
            "data.path={text}",
            "data.reader=bad_readers:big_ids",
            words="data.reader",
        ),
        r(
            "reader plug-in not importable",
            "data.path={text}",
            "data.reader=nope_mod:f",
            words="data.reader",
        ),
        correct(
            "reader plug-in of wide bytes",
            "data.path={text}",
            "data.reader=bad_readers:wide_bytes",
            check=trained_ok,
        ),
        correct(
            "reader plug-in that works",
            "data.path={text}",
            "data.reader=hostile_plugins:text",
            check=trained_ok,
        ),
        Case(
            "reader plug-in that raises",
            "plugin-frame",
            ("data.path={text}", "data.reader=hostile_plugins:raising"),
            "data.reader",
            frame="hostile_plugins.py",
            status=None,
        ),
        Case(
            "callback plug-in that raises",
            "plugin-frame",
            ("+callbacks.boom._target_=boom.Boom", "+callbacks.boom.at_step=2"),
            "callbacks.boom",
            frame="boom.py",
            status=None,
        ),
        Case(
            "cell plug-in that raises",
            "plugin-frame",
            ("model.backend=modular", "model.cell=hostile_plugins:RaisingCell"),
            "model.cell",
            frame="hostile_plugins.py",
            status=None,
        ),
    ]


def figure_of_first(r: Result) -> str | None:
    """evaluate split=val of the first run's checkpoint, over the zeroed cache, gives the
    first run's own val_bpc."""
    first = json.loads((r.d / "first" / "summary.json").read_text())
    try:
        got = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return f"no JSON figures: {r.stdout[-200:]!r}"
    figure = next((v for k, v in got.items() if k.endswith("bpc")), None)
    if figure is None or abs(figure - first["val_bpc"]) > 1e-4:
        return f"evaluate gave {got}; the run's val_bpc was {first['val_bpc']:.4f}"
    return None


def run_folder_cases() -> list[Case]:
    r, kept = refused, ("summary.json", ".hydra/config.yaml", ".hydra/overrides.yaml")
    return [
        r("fresh run over a finished run", words="already holds checkpoints", setup=holds_trained),
        r(
            "ckpt_path into another run's folder",
            "ckpt_path={ckpt}",
            words="another run",
            setup=holds_trained,
        ),
        correct(
            "resume of a finished run",
            RESUME,
            setup=holds_trained,
            keep=kept,
            check=all_of(summary_kept, says("had finished"), no_lock),
        ),
        correct(
            "resume after a stop at the last step",
            RESUME,
            setup=no_summary,
            check=all_of(finished_after_resume, lacks("(0 tokens/s)")),
        ),
        r(
            "resume max_steps below the checkpoint",
            RESUME,
            "trainer.max_steps=3",
            words="trainer.max_steps=3",
            setup=holds_trained,
        ),
        r("resume over a truncated last.ckpt", RESUME, words="last.ckpt", setup=cut_last),
        r("resume with only best.ckpt", RESUME, words="best.ckpt", setup=only_best),
        r(
            "resume with another batch size",
            RESUME,
            "data.batch_size=2",
            words="data.batch_size",
            setup=holds_trained,
        ),
        r(
            "resume with another window",
            RESUME,
            "tbptt.window=8",
            words="tbptt.window",
            setup=holds_trained,
        ),
        r(
            "resume with another learning rate",
            RESUME,
            "optim.lr=0.01",
            words="optim.lr",
            setup=holds_trained,
        ),
        r("resume with another seed", RESUME, "seed=1", words="seed", setup=holds_trained),
        r(
            "resume with another tokenizer",
            RESUME,
            "data.tokenizer=word",
            words="data.tokenizer",
            setup=holds_trained,
        ),
        r(
            "resume with another corpus",
            RESUME,
            "data.path={text}",
            words="data.path",
            setup=holds_trained,
        ),
        r(
            "resume with another hidden size",
            RESUME,
            "model.hidden_size=32",
            words="model.hidden_size",
            setup=holds_trained,
        ),
        r("resume two ways", RESUME, "ckpt_path={ckpt}", words="resume=auto"),
        r(
            "resume fresh and a checkpoint",
            "resume=fresh",
            "ckpt_path={ckpt}",
            words="resume=fresh",
        ),
        correct("resume in an empty folder starts fresh", RESUME, check=trained_ok),
        correct(
            "resume a SIGKILLed run",
            RESUME,
            setup=killed_mid_training,
            check=all_of(trained_ok, no_temp_files("run")),
        ),
        correct(
            "ckpt_path into a new folder",
            "ckpt_path={ckpt}",
            "trainer.max_steps=9",
            check=lambda r: None if r.summary().get("steps") == 9 else "not 9 steps",
        ),
        r("ckpt= naming a folder", "ckpt_path={trained}", words="is a folder"),
        r("missing checkpoint", "ckpt_path=/no/such.ckpt", words="ckpt=/no/such.ckpt"),
        r(
            "truncated checkpoint",
            "ckpt_path={d}/cut.ckpt",
            words="not a readable checkpoint",
            setup=lambda fx, d: (d / "cut.ckpt").write_bytes(fx.ckpt.read_bytes()[:4000]),
        ),
        r(
            "a text file as checkpoint",
            "ckpt_path={d}/notes.ckpt",
            words="notes.ckpt",
            setup=files(**{"notes.ckpt": "my notes\n"}),
        ),
        r(
            "checkpoint without its config",
            "ckpt_path={d}/edited.ckpt",
            words="not a seqtrain checkpoint",
            setup=edited(_no_config),
        ),
        r(
            "checkpoint of another vocabulary",
            "ckpt_path={d}/edited.ckpt",
            words="input_size",
            setup=edited(_vocab_100),
        ),
        r(
            "checkpoint without optimizer state",
            "ckpt_path={d}/edited.ckpt",
            words="optimizer_states",
            setup=edited(_no_optimizer),
        ),
        r(
            "checkpoint without weights",
            "ckpt_path={d}/edited.ckpt",
            words="state_dict",
            setup=edited(_no_weights),
        ),
        r(
            "resume on a corpus that changed",
            "ckpt_path={d}/edited.ckpt",
            words="changed",
            setup=edited(_other_corpus),
        ),
        r(
            "run folder is a file",
            "hydra.run.dir={d}/afile",
            words="is a file",
            setup=files(afile=b"x"),
        ),
        r(
            "run folder under a file",
            "hydra.run.dir={d}/afile/run",
            words="is a file",
            setup=files(afile=b"x"),
        ),
        r("run folder with ~", "hydra.run.dir=~/seqtrain-run", words="~"),
        r(
            "run folder read-only",
            "hydra.run.dir={d}/ro/run",
            words="not writable",
            setup=steps(lambda fx, d: (d / "ro").mkdir(mode=0o555)),
            unprivileged=True,
        ),
        r(
            "read-only cli.log",
            words="cli.log",
            own_folder=True,
            keep=("cli.log",),
            setup=steps(
                lambda fx, d: (d / "run").mkdir(),
                files(**{"run/cli.log": "old\n"}),
                chmod("run/cli.log", 0o444),
            ),
            unprivileged=True,
        ),
        warned(
            "read-only tensorboard/",
            words="tensorboard",
            unprivileged=True,
            own_folder=True,
            check=trained_ok,
            setup=steps(
                lambda fx, d: (d / "run" / "tensorboard").mkdir(parents=True),
                chmod("run/tensorboard", 0o555),
            ),
        ),
        r("full disk", words="no space left", setup=tmpfs("run", "600k", 540), own_folder=True),
        r("folder locked by a live run", words="in use", setup=lock("1 {host}")),
        r("folder locked by another host", words="rm ", setup=lock("4242 node-17.cluster")),
        r(
            "stale lock of another host",
            words="72 h old",
            setup=lock("4242 node-17.cluster", age_h=72),
        ),
        warned(
            "lock of a dead process",
            words="lock",
            check=trained_ok,
            setup=lambda fx, d: lock(f"{dead_pid()} {{host}}")(fx, d),
        ),
        correct(
            "run folder with a space",
            "hydra.run.dir='{d}/my run'",
            check=lambda r: (
                None
                if (r.d / "my run" / "summary.json").is_file()
                else "no summary.json in 'my run'"
            ),
        ),
    ]


def tool_cases() -> list[Case]:
    r, s, e = refused, {"tool": "sample"}, {"tool": "evaluate"}
    return [
        correct("sample a finished run", "ckpt={ckpt}", "length=20", check=sample_text, **s),
        r("sample length zero", "ckpt={ckpt}", "length=0", words="length=0", **s),
        r("sample top_k above the vocabulary", "ckpt={ckpt}", "top_k=1000", words="top_k", **s),
        r("sample temperature NaN", "ckpt={ckpt}", "temperature=nan", words="temperature", **s),
        r("sample temperature zero", "ckpt={ckpt}", "temperature=0", words="temperature", **s),
        r("sample device cuda", "ckpt={ckpt}", "device=cuda", words="device=cuda", **s),
        r("sample unknown device", "ckpt={ckpt}", "device=abacus", words="device=abacus", **s),
        r(
            "sample NaN weights",
            "ckpt={d}/edited.ckpt",
            words="NaN",
            setup=edited(_nan_weights),
            **s,
        ),
        r("sample a missing checkpoint", "ckpt=/no/such.ckpt", words="/no/such.ckpt", **s),
        r("sample without a checkpoint", "length=5", words="ckpt", **s),
        r("sample unknown key", "ckpt={ckpt}", "lenght=5", words="lenght", **s),
        r("sample a folder", "ckpt={trained}", words="is a folder", **s),
        r(
            "sample a truncated checkpoint",
            "ckpt={d}/cut.ckpt",
            words="cut.ckpt",
            setup=lambda fx, d: (d / "cut.ckpt").write_bytes(fx.ckpt.read_bytes()[:4000]),
            **s,
        ),
        r("sample a prompt of no words", "ckpt={word_ckpt}", "prompt= ", words="prompt", **s),
        correct(
            "evaluate the val split", "ckpt={ckpt}", "split=val", check=evaluates_to_trained, **e
        ),
        r("evaluate an unknown split", "ckpt={ckpt}", "split=dev", words="split=dev", **e),
        r("evaluate batch size zero", "ckpt={ckpt}", "batch_size=0", words="batch_size", **e),
        r("evaluate device cuda", "ckpt={ckpt}", "device=cuda", words="device=cuda", **e),
        r(
            "evaluate NaN weights",
            "ckpt={d}/edited.ckpt",
            words="NaN",
            setup=edited(_nan_weights),
            **e,
        ),
        r(
            "evaluate with another tokenizer",
            "ckpt={ckpt}",
            "data.tokenizer=word",
            words="data.tokenizer",
            **e,
        ),
        r(
            "evaluate a corpus that changed",
            "ckpt={d}/edited.ckpt",
            words="changed",
            setup=edited(_other_corpus),
            **e,
        ),
        r(
            "evaluate a corpus that moved",
            "ckpt={d}/edited.ckpt",
            words="no longer there",
            setup=edited(_moved_corpus),
            **e,
        ),
        r(
            "evaluate a missing data.path",
            "ckpt={ckpt}",
            "data.path=/no/such.txt",
            words="data.path=/no/such.txt",
            **e,
        ),
        r("evaluate a typo key", "ckpt={ckpt}", "splt=val", words="splt", **e),
        r("recall of a byte LM", "ckpt={ckpt}", words="recall", tool="recall", status=2),
        r("recall unknown key", "ckpt={ckpt}", "exampels=5", words="exampels", tool="recall"),
        r("report of a missing folder", "/no/such/sweep", words="/no/such/sweep", tool="report"),
        r(
            "report of an empty folder",
            "{d}/empty",
            words="no job",
            setup=lambda fx, d: (d / "empty").mkdir(),
            tool="report",
        ),
        correct(  # one line per failed job, and the count: the sweep goes on
            "sweep job crashing with a plain exception",
            "-m",
            "data.path={text}",
            "data.reader=hostile_plugins:raising,text",
            "hydra.sweep.dir={d}/sweep",
            status=1,
            check=all_of(sweep_failure_reported, says("1 sweep job(s) failed")),
            timeout=300,
        ),
    ]


def signal_cases() -> list[Case]:
    r = refused
    stop_after = ("trainer.checkpoint_every=1",)
    return [
        r(
            "Ctrl-C during tokenization",
            *SLOW,
            words="interrupted (SIGINT)",
            status=130,
            send=(signal.SIGINT, "mark"),
            env=(("SLOW_MARK", "{d}/mark"),),
            check=all_of(no_temp_files("cache"), no_lock),
        ),
        r(
            "SIGTERM during tokenization",
            *SLOW,
            words="interrupted (SIGTERM)",
            status=143,
            send=(signal.SIGTERM, "mark"),
            env=(("SLOW_MARK", "{d}/mark"),),
            check=all_of(no_temp_files("cache"), no_lock),
        ),
        r("Ctrl-C at startup", words="interrupted", status=130, send=(signal.SIGINT, 1.0)),
        r("SIGTERM at startup", words="interrupted", status=143, send=(signal.SIGTERM, 1.0)),
        correct(
            "SIGTERM during training resumes",
            *stop_after,
            *MARK_ARGS("{d}", 0.3),
            send=(signal.SIGTERM, "mark"),
            status=143,
            check=resume_command_works,
        ),
        correct(
            "resume command of a folder with a space",
            *stop_after,
            *MARK_ARGS("{d}", 0.3),
            "hydra.run.dir='{d}/my run'",
            send=(signal.SIGTERM, "mark"),
            status=143,
            check=resume_command_works,
        ),
        r(
            "peer killed under DDP",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "+callbacks.kill._target_=hostile_plugins.KillRank",
            "+callbacks.kill.rank=1",
            "+callbacks.kill.at_step=2",
            words="another rank",
            status=None,
            timeout=300,
        ),
    ]


GROUPS = {
    "config": config_cases,
    "corpus": corpus_cases,
    "tokens": token_array_cases,
    "series": series_cases,
    "tokenizers": tokenizer_cases,
    "runs": run_folder_cases,
    "tools": tool_cases,
    "signals": signal_cases,
}


def cases(groups: list[str] | None = None) -> list[Case]:
    """The table, or the cases of `groups` in their order."""
    return [case for group in groups or GROUPS for case in GROUPS[group]()]


# --- running and classifying


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below folder and the blake2b of its bytes (links as their targets)."""
    found = {}
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            try:
                found[rel] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
            except OSError as err:
                found[rel] = f"unreadable ({err.strerror})"
    return found


def changes(before: dict[str, str], after: dict[str, str], strict: bool, keep=()) -> str:
    """What happened to the files a folder held: strict (a refusal in a folder it does not own)
    allows nothing, otherwise a file may change (not those in keep) but not vanish; locks and
    temporary files come and go."""
    transient = (".seqtrain.lock", ".tmp")
    gone = [f for f in before if f not in after and (strict or not f.endswith(transient))]
    changed = [f for f in before if f in after and before[f] != after[f]]
    changed = changed if strict else [f for f in changed if f in keep]
    added = [f for f in after if f not in before] if strict else []
    parts = [
        f"{what}: {', '.join(names[:4])}"
        for what, names in (("vanished", gone), ("changed", changed), ("written into it", added))
        if names
    ]
    return "; ".join(parts)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def default_signals() -> None:
    """In the child: Ctrl-C as a terminal sends it. A job started in the background (`cmd &`)
    ignores SIGINT, and the cases would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(case: Case, fx: Fixtures, d: Path) -> tuple[list[str], dict, Path]:
    """The case's argv, environment and run folder."""
    paths = Paths(fx, d)
    args = [a.format_map(paths) for a in case.args]
    run = d / "run"
    prefix = UNPRIVILEGED if case.unprivileged and os.geteuid() == 0 else ()
    argv = [*prefix, sys.executable, *TOOLS[case.tool]]
    if case.tool == "seqtrain":
        argv += list(TINY) if case.tiny else []
        given = [a for a in args if a.startswith("hydra.run.dir=")]
        if given:
            run = Path(given[-1].partition("=")[2].strip("'\"")).expanduser()
        elif not any(a.startswith("hydra.sweep.dir=") for a in args):
            args.append(f"hydra.run.dir={run}")
    env = dict(fx.env)
    for key, value in case.env:
        env[key] = value.format_map(paths).replace("$PYTHONPATH", fx.env["PYTHONPATH"])
    return argv + args, env, run


def run_case(case: Case, fx: Fixtures) -> Result:
    d = fx.root / "cases" / slug(case.name)
    d.mkdir(parents=True)
    result = Result(case, d, paths=Paths(fx, d))
    try:
        if case.setup is not None:
            case.setup(fx, d)
        argv, env, result.run = command(case, fx, d)
    except Skip as why:
        result.verdict, result.note = "skipped", str(why)
        return result
    except Exception as err:  # a fixture or first run that failed: seqtrain failed there
        result.verdict, result.note = "setup failed", f"{type(err).__name__}: {err}"[:300]
        return result
    result.env = env
    guarded = {result.run: snapshot(result.run)} if result.run.exists() else {}
    shared = [fx.trained] if any("{trained}" in a or "{ckpt}" in a for a in case.args) else []
    guarded.update({folder: snapshot(folder) for folder in shared})
    try:
        execute(case, argv, env, result)
        result.verdict, result.note = classify(case, result, guarded)
    finally:
        for child in d.iterdir():
            if os.path.ismount(child):
                subprocess.run(["umount", "-l", str(child)], check=False)
    return result


def execute(case: Case, argv: list[str], env: dict, result: Result) -> None:
    """Run the process (sending the case's signal) within the case's time; kill it and every
    child (DDP ranks) when it hangs."""
    started = time.monotonic()
    child = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=default_signals,
    )
    if case.send is not None:
        signum, when = case.send
        threading.Thread(target=send, args=(child, signum, when, result.d), daemon=True).start()
    try:
        result.stdout, result.stderr = child.communicate(timeout=case.timeout)
        result.rc = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        result.stdout, result.stderr = child.communicate()
        result.hung = True
    result.seconds = time.monotonic() - started


def send(child: subprocess.Popen, signum: int, when: str | float, d: Path) -> None:
    if isinstance(when, str):
        wait_for(d / when, 200)
    else:
        time.sleep(when)
    if child.poll() is None:
        child.send_signal(signum)


def classify(case: Case, r: Result, guarded: dict[Path, dict]) -> tuple[str, str]:
    if r.hung:
        return "hang", f"no exit within {case.timeout:.0f} s"
    strict = case.expect == "refused" and not case.own_folder
    for folder, before in guarded.items():
        keep = case.keep if folder == r.run else ()
        lost = changes(before, snapshot(folder), strict or folder != r.run, keep)
        if lost:
            return "data loss", f"{folder.name}/: {lost}"
    lines = r.text.splitlines()
    errors = [x for x in lines if ERROR_LINE.match(x)]
    status = case.status
    if status == DEFAULT:
        status = 2 if case.expect == "refused" else 0
    said = f"exit {r.rc}: {(errors or [x for x in lines if x.strip()] or [''])[-1][:160]}"
    if case.expect == "plugin-frame":
        if r.rc == 0:
            return "silently wrong", "exit 0 after the plug-in raised"
        if TRACEBACK in r.text:  # the key's line and the plug-in's own frame only
            return "traceback", f"exit {r.rc}: a traceback besides the plug-in's frame"
        if case.frame not in r.text or case.words not in r.text:
            return "wrong message", f"{said} (frame {case.frame} and {case.words} wanted)"
    elif TRACEBACK in r.text:
        frames = [x.strip() for x in lines if x.strip().startswith("File ")]
        where = frames[-1][:120] if frames else ""
        return "traceback", f"exit {r.rc}: {lines[-1][:120] if lines else ''} ({where})"
    elif case.expect == "refused":
        if r.rc == 0:
            return "silently wrong", "exit 0 where a refusal was due"
        if status is not None and r.rc != status or status is None and r.rc == 0:
            return "wrong message", f"{said} (exit {status} wanted)"
        if len(errors) != 1 or case.words not in errors[0]:
            return "wrong message", f"{said} ({len(errors)} error lines; {case.words!r} wanted)"
    else:
        if status is not None and r.rc != status:
            return "wrong message", f"{said} (exit {status} wanted)"
        if case.expect == "warned" and not any("WARNING" in x and case.words in x for x in lines):
            return "silently wrong", f"no WARNING line naming {case.words!r}"
    if case.check is not None:
        try:
            problem = case.check(r)
        except Exception as err:  # a check that cannot read what it checks: the run is wrong
            problem = f"the check failed: {type(err).__name__}: {err}"
        if problem:
            return "silently wrong", problem
    return "ok", ""


# --- the command line


def selected(args: argparse.Namespace) -> list[Case]:
    table = cases(args.group)
    if args.smoke:
        table = [c for c in table if c.name in SMOKE]
    if args.only:
        table = [c for c in table if args.only.lower() in c.name.lower()]
    return table


def row(r: Result) -> str:
    return f"{r.case.name[:52]:52}  {r.case.expect:12}  {r.verdict:16}  {r.seconds:5.1f}s  {r.note}"


def markdown(results: list[Result], counts: Counter, command_line: str, root: Path) -> str:
    """The table as markdown. Arguments are <code>, not backticks: scripts/check_docs.py runs
    the commands and checks the keys of code spans, and these are hostile on purpose."""

    def cell(text: str) -> str:
        text = text.replace(str(root / "cases"), "TMP").replace(str(root), "TMP")
        return html.escape(text).replace("|", "&#124;").replace("\n", " ")

    lines = [
        "# The hostile table",
        "",
        "What a new or hostile user does through the command line, each case with the outcome it",
        "must have (issue #24; docs/reliability.md, The hostile table). TMP/CASE is the case's",
        "folder, TMP/fixtures the shared ones. Written by:",
        "",
        f"    {command_line}",
        "",
        "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        "",
        "| case | command | expected | verdict | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        c = r.case
        shown = " ".join((f"seqtrain.{c.tool}" if c.tool != "seqtrain" else "seqtrain", *c.args))
        shown = shown.replace("{d}", str(r.d))
        lines.append(
            f"| {cell(c.name)} | <code>{cell(shown)}</code> | {c.expect} | {r.verdict} | "
            f"{cell(r.note)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="the cases whose name holds this text")
    parser.add_argument(
        "--group", action="append", choices=list(GROUPS), help="these groups, in this order"
    )
    parser.add_argument("--smoke", action="store_true", help="a handful of quick cases")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="cases run at once")
    parser.add_argument("--write", type=Path, help="write the table as markdown here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--list", action="store_true", help="print the case names and stop")
    args = parser.parse_args(argv)
    table = selected(args)
    names = [c.name for c in cases()]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        parser.error(f"case names twice: {sorted(duplicates)}")
    if args.list:
        print("\n".join(f"{c.expect:12} {c.name}" for c in table))
        return 0
    root = Path(tempfile.mkdtemp(prefix="seqtrain-hostile-"))
    root.chmod(0o755)  # the unprivileged user's cases read the fixtures
    fx = Fixtures(root)
    print(f"{len(table)} cases, {args.jobs} at a time, in {root}", flush=True)
    results: list[Result] = []
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for result in pool.map(lambda c: run_case(c, fx), table):
                results.append(result)
                print(row(result), flush=True)
    finally:
        if not args.keep:
            subprocess.run(["chmod", "-R", "u+rwX", str(root)], check=False)
            shutil.rmtree(root, ignore_errors=True)
    counts = Counter(r.verdict for r in results)
    counts = Counter({v: counts[v] for v in VERDICTS if counts[v]})
    print("\nverdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.write is not None:
        shown = " ".join(
            ["python scripts/hostile.py", *(argv if argv is not None else sys.argv[1:])]
        )
        args.write.write_text(markdown(results, counts, shown, root))
    failed = [r for r in results if r.verdict not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
