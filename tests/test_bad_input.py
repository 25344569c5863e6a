"""Every bad input exits non-zero before any work, with one line, and overwrites nothing.

The cases here are the table in docs/errors.md; a test checks the two stay in step. To add a
case, add one Case row: its name, the arguments, the tell-tale part of the message and, when the
run folder must hold something first, a setup; then its row in docs/errors.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from seqtrain import cli, evaluate, sample, train
from seqtrain.config import validate

from .conftest import ROOT, composed

TINY = ["+debug=tiny", "trainer.sample_length=0"]
REGRESSION = ["task=regression", "data.source=mackey_glass", "data.length=2000"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run whose checkpoint the checkpoint cases start from."""
    run_dir = tmp_path_factory.mktemp("trained")
    train.fit(train.prepare(validate(composed(*TINY)), run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def _file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


NOT_JSON = b'{"text": "a"}\n{oops}\n'  # JSON Lines whose line 2 is not JSON
NO_TEXT = b'{"body": "a"}\n'  # a record without data.text_field


def _dir(tmp: Path, name: str, files: dict[str, bytes] | None = None) -> str:
    for file, content in (files or {}).items():
        (tmp / name / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name / file).write_bytes(content)
    (tmp / name).mkdir(exist_ok=True)
    return str(tmp / name)


def _npy(tmp: Path, name: str, array: np.ndarray) -> str:
    np.save(tmp / name, array)
    return str(tmp / name)


def _checkpoint(tmp: Path, trained: Path, edit) -> str:
    ckpt = torch.load(trained, weights_only=True)
    edit(ckpt)
    path = tmp / "edited.ckpt"
    torch.save(ckpt, path)
    return str(path)


def _vocab_100(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["spec"]["input_size"] = 100


def _other_corpus(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["spec"]["corpus"] = "sha256:" + "0" * 64


def _moved_corpus(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["config"]["data"]["path"] = "/no/such/moved.txt"


def _nan_weights(ckpt: dict) -> None:
    ckpt["state_dict"]["model.head.weight"].fill_(float("nan"))


NOT_A_TOKENIZER = b'{"a": 1}'  # JSON, but not the tokenizers library's


def _fifo(tmp: Path) -> str:
    path = tmp / "fifo"
    os.mkfifo(path)
    return str(path)


def _loop(tmp: Path) -> str:
    """A symlink that points, through another, back at itself."""
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    return str(tmp / "loop-a")


def _three_tokens() -> bytes:
    """A valid tokenizer.json (the tokenizers library's) of a 3-token vocabulary."""
    from tokenizers import Tokenizer, models

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    return Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).to_str().encode()


class Case(NamedTuple):
    name: str
    args: Callable[[Path, Path], list[str]]  # given the tmp dir and a trained checkpoint
    message: str  # the tell-tale part of the one line
    setup: Callable[[Path, Path], None] | None = None  # fills the run folder (run_dir, trained)
    tool: str = "seqtrain"  # seqtrain | sample | evaluate
    needs_no_cuda: bool = False  # the case is an error only on a machine without CUDA


def _holds_run(run_dir: Path, trained: Path) -> None:
    """The run folder holds the finished trained run's checkpoints and summary."""
    shutil.copytree(trained.parent, run_dir / "checkpoints")
    shutil.copy(trained.parent.parent / "summary.json", run_dir / "summary.json")


def _cut_last(run_dir: Path, trained: Path) -> None:
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(trained.read_bytes()[:5000])


def _only_best(run_dir: Path, trained: Path) -> None:
    (run_dir / "checkpoints").mkdir()
    shutil.copy(trained.parent / "best.ckpt", run_dir / "checkpoints" / "best.ckpt")


def _locked(run_dir: Path, trained: Path) -> None:  # pid 1 is alive: another run owns it
    (run_dir / ".seqtrain.lock").write_text(f"1 {socket.gethostname()}\n")


def _locked_elsewhere(run_dir: Path, trained: Path) -> None:
    (run_dir / ".seqtrain.lock").write_text("4242 node-17.cluster\n")


def _stale_elsewhere(run_dir: Path, trained: Path) -> None:
    _locked_elsewhere(run_dir, trained)
    days_ago = time.time() - 3 * 24 * 3600
    os.utime(run_dir / ".seqtrain.lock", (days_ago, days_ago))


LOCKED = (_locked, _locked_elsewhere, _stale_elsewhere)  # setups whose lock is another run's


def _resume(*args: str) -> Callable[[Path, Path], list[str]]:
    return lambda t, c: ["resume=auto", *args]


CASES = [
    (
        "missing corpus",
        lambda t, c: ["data.path=/no/such.txt"],
        "data.path=/no/such.txt: no such file",
    ),
    ("empty corpus", lambda t, c: [f"data.path={_file(t, 'e.txt', b'')}"], "the file is empty"),
    (
        "empty directory as corpus",
        lambda t, c: [f"data.path={_dir(t, 'empty')}"],
        "empty: the directory holds no files (hidden ones are skipped)",
    ),
    (
        "unreadable corpus",
        lambda t, c: [f"data.path={_file(t, 'locked.txt', b'x' * 9999)}"],
        "cannot read",
    ),
    (
        "corpus too short for one window",
        lambda t, c: [f"data.path={_file(t, 's.txt', b'x' * 300)}"],
        "the val split has 15 bytes, too few for one window of tbptt.window 16 (+ 1) per rank",
    ),
    (
        "config typo",
        lambda t, c: ["model.hiden_size=3"],
        "model.hiden_size is not a key; 'model' takes:",
    ),
    (
        "experiment without +",
        lambda t, c: ["experiment=char_lm"],
        "experiment: not in the base config's defaults list; add it with a +: +experiment=char_lm",
    ),
    ("unknown group option", lambda t, c: ["data=wiki"], "data=wiki: no such option; choose from"),
    (
        "unknown backend",
        lambda t, c: ["model.backend=cuda"],
        "model.backend=cuda: choose from cudnn, jit",
    ),
    (
        "a CUDA-only backend on a CPU",
        lambda t, c: ["model.cell=gdn", "model.backend=fla"],
        "model.backend=fla runs model.cell=gdn on cuda only; this run is on cpu: choose one of "
        "modular, compile (the same parameters)",
    ),
    ("unknown cell", lambda t, c: ["model.cell=rnn"], "model.cell=rnn: choose from lstm, gru"),
    ("window zero", lambda t, c: ["tbptt.window=0"], "tbptt.window=0: must be a positive integer"),
    (
        "stride above window",
        lambda t, c: ["tbptt.stride=17"],
        "tbptt.stride=17: must be in 1..tbptt.window",
    ),
    (
        "varied windows with a stride",
        lambda t, c: ["tbptt.vary=true", "tbptt.stride=8"],
        "tbptt.stride=8: tbptt.vary=true draws each whole window (plain TBPTT)",
    ),
    (
        "varied windows too short",
        lambda t, c: ["tbptt.vary=true", "tbptt.window=8"],
        "tbptt.window=8: tbptt.vary=true needs a window of at least 10",
    ),
    (
        "batch size zero",
        lambda t, c: ["data.batch_size=0"],
        "data.batch_size=0: must be a positive",
    ),
    ("negative learning rate", lambda t, c: ["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
    (
        "nonmono of zero",
        lambda t, c: ["optim=ntasgd", "optim.nonmono=0"],
        "optim.nonmono=0: must be a positive number of passes",
    ),
    (
        "unknown averaging rule",
        lambda t, c: ["optim.average=swa"],
        "optim.average=swa: no such option; choose from nt",
    ),
    ("negative AR", lambda t, c: ["model.ar=-1"], "model.ar=-1.0: must be >= 0 and finite"),
    ("infinite TAR", lambda t, c: ["model.tar=inf"], "model.tar=inf: must be >= 0 and finite"),
    (
        "dropout of 1.5",
        lambda t, c: ["model.dropout=1.5"],
        "model.dropout=1.5: must be a probability",
    ),
    ("text for a number", lambda t, c: ["model.hidden_size=big"], "model.hidden_size: Value 'big'"),
    ("bad split", lambda t, c: ["data.split=[0.9,0.1]"], "data.split=[0.9, 0.1]: must be three"),
    (
        "missing checkpoint",
        lambda t, c: ["ckpt_path=/no/such.ckpt"],
        "ckpt=/no/such.ckpt: no such file",
    ),
    (
        "checkpoint path is a folder",
        lambda t, c: [f"ckpt_path={c.parent.parent}"],
        "is a folder; name a checkpoint file: e.g. ckpt=",
    ),
    (
        "model too large for the memory",
        lambda t, c: ["model.hidden_size=100000"],
        "model.hidden_size=100000, model.num_layers=1: 160.1 GB of weights",
    ),
    (
        "truncated checkpoint",
        lambda t, c: [f"ckpt_path={_file(t, 'cut.ckpt', c.read_bytes()[:5000])}"],
        "not a readable checkpoint",
    ),
    (
        "not a checkpoint",
        lambda t, c: [f"ckpt_path={_file(t, 'notes.ckpt', b'hello')}"],
        "not a readable checkpoint",
    ),
    (
        "another program's checkpoint",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, lambda k: k.pop('hyper_parameters'))}"],
        "not a seqtrain checkpoint",
    ),
    (
        "checkpoint of another model shape",
        lambda t, c: [f"ckpt_path={c}", "model.hidden_size=32"],
        "was trained with model.hidden_size=16 (now 32)",
    ),
    (
        "checkpoint of another vocabulary",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, _vocab_100)}"],
        "trained on data of kind tokens, input_size 100",
    ),
    (
        "resume with options that change the model",
        lambda t, c: [f"ckpt_path={c}", "model.num_layers=2"],
        "model.num_layers=1 (now 2)",
    ),
    (
        "Trainer argument seqtrain owns",
        lambda t, c: ["+trainer.gradient_clip_val=1"],
        "trainer.gradient_clip_val: not settable in seqtrain: the module clips by hand",
    ),
    (
        "validation switched off",
        lambda t, c: ["+trainer.limit_val_batches=0"],
        "trainer.limit_val_batches: not settable in seqtrain: the val figure is taken over the "
        "whole val split",
    ),
    (
        "train epoch cut short",
        lambda t, c: ["+trainer.limit_train_batches=2"],
        "trainer.limit_train_batches: not settable in seqtrain: an epoch cut short restarts",
    ),
    (
        "not a Trainer argument",
        lambda t, c: ["+trainer.clip=1"],
        "trainer.clip is not a lightning.Trainer argument",
    ),
    (
        "misspelt _target_",
        lambda t, c: ["optim.optimizer._target_=torch.optim.AdamWW"],
        "optim.optimizer._target_=torch.optim.AdamWW: no such class or function",
    ),
    (
        "argument the optimizer does not take",
        lambda t, c: ["+optim.optimizer.momentum=0.9"],
        "optim.optimizer.momentum: torch.optim.AdamW takes no such argument",
    ),
    (
        "resume two ways",
        lambda t, c: [f"ckpt_path={c}", "resume=auto"],
        "give either resume=auto or",
    ),
]
CASES = [Case(*row) for row in CASES] + [
    # A run owns its folder; no way of starting overwrites another run.
    Case("run folder in use", lambda t, c: [], "in use by the run of pid 1", _locked),
    Case(
        "run folder locked by another host",
        lambda t, c: [],
        "in use by the run of pid 4242 on node-17.cluster",
        _locked_elsewhere,
    ),
    Case(
        "stale lock of another host",
        lambda t, c: [],
        "is 72 h old (stale after SEQTRAIN_LOCK_STALE_HOURS=24): if that run is gone, remove it: rm",
        _stale_elsewhere,
    ),
    Case(
        "fresh run over a finished run",
        lambda t, c: [],
        "already holds checkpoints; pass resume=auto",
        _holds_run,
    ),
    Case(
        "ckpt_path into another run's folder",
        lambda t, c: [f"ckpt_path={c}"],
        "already holds another run; resume from ckpt_path into a new hydra.run.dir",
        _holds_run,
    ),
    Case(
        "resume over an unreadable last.ckpt",
        _resume(),
        "resume=auto: ckpt=",
        _cut_last,
    ),
    Case(
        "resume with only best.ckpt",
        _resume(),
        "holds no last.ckpt (only best.ckpt); name one with ckpt_path=",
        _only_best,
    ),
    Case(
        "run folder is a file",
        lambda t, c: [f"hydra.run.dir={_file(t, 'afile', b'x')}"],
        "is a file; choose a folder",
    ),
    Case(
        "run folder with ~",
        lambda t, c: ["hydra.run.dir='~/seqtrain-run'"],
        "hydra.run.dir='~/seqtrain-run': Hydra does not expand ~; write the folder out",
    ),
    Case(
        "run folder under a file",
        lambda t, c: [f"hydra.run.dir={_file(t, 'afile', b'x')}/run"],
        "is a file; choose a folder",
    ),
    # Resume refuses what would make it wrong (docs/reliability.md has the table of settings).
    Case(
        "resume past trainer.max_steps",
        _resume("trainer.max_steps=3"),
        "trainer.max_steps=3: below the step of ckpt=",
        _holds_run,
    ),
    Case(
        "resume with another batch size",
        _resume("data.batch_size=2"),
        "data.batch_size=4 (now 2)",
        _holds_run,
    ),
    Case(
        "resume with another window",
        _resume("tbptt.window=8"),
        "tbptt.window=16 (now 8)",
        _holds_run,
    ),
    Case(
        "resume with another stride",
        _resume("tbptt.stride=8"),
        "tbptt.stride=None (now 8)",
        _holds_run,
    ),
    Case(
        "resume with varied windows",
        _resume("tbptt.vary=true"),
        "tbptt.vary=False (now True)",
        _holds_run,
    ),
    Case(
        "resume with weight averaging",
        _resume("optim.average=nt"),
        "optim.average=None (now nt)",
        _holds_run,
    ),
    Case(
        "resume with another corpus slice",
        _resume("data.max_bytes=50000"),
        "data.max_bytes=60000 (now 50000)",
        _holds_run,
    ),
    Case(
        "resume with another learning rate",
        _resume("optim.lr=0.01"),
        "optim.lr=0.002 (now 0.01)",
        _holds_run,
    ),
    Case("resume with another seed", _resume("seed=1"), "seed=1234 (now 1)", _holds_run),
    Case(
        "resume from a checkpoint without optimizer state",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, lambda k: k.pop('optimizer_states'))}"],
        "lacks optimizer_states",
    ),
    Case(
        "checkpoint without weights",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, lambda k: k.pop('state_dict'))}"],
        "holds no weights (state_dict missing)",
    ),
    Case("unknown resume mode", lambda t, c: ["resume=yes"], "resume=yes: choose from auto, fresh"),
    Case(
        "resume fresh and a checkpoint",
        lambda t, c: [f"ckpt_path={c}", "resume=fresh"],
        "give either resume=fresh or ckpt_path=PATH",
    ),
    # What the machine cannot run.
    Case(
        "accelerator the machine lacks",
        lambda t, c: ["trainer.accelerator=gpu"],
        "trainer.accelerator=gpu: this machine has no CUDA GPU",
        needs_no_cuda=True,
    ),
    Case(
        "unknown accelerator",
        lambda t, c: ["trainer.accelerator=tpu"],
        "trainer.accelerator=tpu: choose from auto, cpu, gpu",
    ),
    Case(
        "nodes without a cluster",
        lambda t, c: ["trainer.num_nodes=2"],
        "trainer.num_nodes=2: no cluster launcher started the other nodes",
    ),
    Case(
        "budget below the minimum",
        lambda t, c: ["memory.budget=1KB"],
        "memory.budget=1KB: no checkpointing needs a peak of",
    ),
    # Values that pass a type check but cannot train.
    Case("seed out of range", lambda t, c: ["seed=-1"], "seed=-1: must be in 0..2**32-1"),
    Case(
        "seed too large", lambda t, c: ["seed=4294967296"], "seed=4294967296: must be in 0..2**32-1"
    ),
    Case(
        "DDP wait of zero seconds",
        lambda t, c: ["trainer.ddp_timeout=0"],
        "trainer.ddp_timeout=0.0: must be a finite number of seconds > 0",
    ),
    Case(
        "infinite DDP wait",
        lambda t, c: ["trainer.ddp_timeout=inf"],
        "trainer.ddp_timeout=inf: must be a finite number of seconds > 0",
    ),
    Case(
        "infinite learning rate",
        lambda t, c: ["optim.lr=inf"],
        "optim.lr=inf: must be > 0 and finite",
    ),
    Case(
        "NaN learning rate", lambda t, c: ["optim.lr=nan"], "optim.lr=nan: must be > 0 and finite"
    ),
    Case(
        "max_skipped zero",
        lambda t, c: ["optim.max_skipped=0"],
        "optim.max_skipped=0: must be a positive",
    ),
    Case(
        "negative weight decay",
        lambda t, c: ["optim.weight_decay=-1"],
        "optim.weight_decay=-1.0: must be >= 0",
    ),
    Case(
        "infinite grad clip",
        lambda t, c: ["optim.grad_clip=inf"],
        "optim.grad_clip=inf: must be > 0 and finite",
    ),
    Case(
        "NaN forget bias",
        lambda t, c: ["model.forget_bias=nan"],
        "model.forget_bias=nan: must be finite",
    ),
    Case(
        "split with inf",
        lambda t, c: ["data.split=[inf,0.05,0.05]"],
        "must be three positive fractions",
    ),
    Case(
        "devices zero", lambda t, c: ["trainer.devices=0"], "trainer.devices=0: must be a positive"
    ),
    Case(
        "unknown precision",
        lambda t, c: ["trainer.precision=16"],
        "trainer.precision=16: choose from 32-true",
    ),
    Case(
        "spawn strategy",
        lambda t, c: ["trainer.strategy=ddp_spawn"],
        "trainer.strategy=ddp_spawn: choose from auto, ddp",
    ),
    Case(
        "max_steps zero",
        lambda t, c: ["trainer.max_steps=0"],
        "trainer.max_steps=0: must be a positive",
    ),
    Case(
        "checkpoint interval zero",
        lambda t, c: ["trainer.checkpoint_every=0"],
        "trainer.checkpoint_every=0: must be a positive",
    ),
    Case(
        "negative sample length",
        lambda t, c: ["trainer.sample_length=-1"],
        "trainer.sample_length=-1: must be >= 0",
    ),
    Case("unknown data source", lambda t, c: ["data.source=wiki"], "data.source=wiki"),
    Case(
        "unknown checkpoint mode",
        lambda t, c: ["memory.checkpoint=all"],
        "memory.checkpoint=all: choose from none, chunk, auto",
    ),
    Case(
        "unreadable memory budget",
        lambda t, c: ["memory.budget=lots"],
        "memory.budget=lots: not a size",
    ),
    # Heads over a vocabulary (docs/heads.md).
    Case(
        "tied head of another size",
        lambda t, c: ["model.tie_weights=true"],
        "model.tie_weights=true: the head's input (model.hidden_size=16) must equal "
        "model.embedding_size=8; set model.proj_size=8",
    ),
    Case(
        "unknown head",
        lambda t, c: ["model.head=softmax"],
        "model.head=softmax: no such option; choose from linear, adaptive",
    ),
    Case(
        "cutoffs not increasing",
        lambda t, c: ["model.head=adaptive", "model.cutoffs=[100,50]"],
        "model.cutoffs=[100, 50]: must be strictly increasing and > 0",
    ),
    Case(
        "cutoffs at the vocabulary size",
        lambda t, c: ["model.head=adaptive", "model.cutoffs=[100,256]"],
        "model.cutoffs=[100, 256]: must be < the vocabulary size 256",
    ),
    Case(
        "adaptive head without cutoffs",
        lambda t, c: ["model.head=adaptive"],
        "model.cutoffs=[]: model.head=adaptive needs one or more",
    ),
    Case(
        "more clusters than the head input allows",
        lambda t, c: ["model.head=adaptive", "model.cutoffs=[10,20,30]"],
        "model.cutoffs=[10, 20, 30]: 3 clusters need a head input of at least 64",
    ),
    Case(
        "cutoffs for the linear head",
        lambda t, c: ["model.cutoffs=[100]"],
        "model.cutoffs=[100]: model.head=linear takes none",
    ),
    Case(
        "tied adaptive head",
        lambda t, c: [
            "model.head=adaptive",
            "model.cutoffs=[64]",
            "model.tie_weights=true",
            "model.embedding_size=16",
        ],
        "model.tie_weights=true: model.head=adaptive has no single (V, E) matrix to share",
    ),
    Case(
        "adaptive head for regression",
        lambda t, c: [*REGRESSION, "model.head=adaptive", "model.cutoffs=[4]"],
        "model.head=adaptive: Regression builds its own head",
    ),
    Case(
        "tied head for regression",
        lambda t, c: [*REGRESSION, "model.tie_weights=true", "model.embedding_size=16"],
        "model.tie_weights=true: Regression has no token embedding for its head to share",
    ),
    Case(
        "override syntax error",
        lambda t, c: ["model.hidden_size=[1"],
        "override syntax: no viable alternative",
    ),
    Case(
        "FIFO as corpus",
        lambda t, c: [f"data.path={_fifo(t)}"],
        "is not a regular file (a FIFO, device or socket)",
    ),
    # Corpus files (docs/corpora.md): JSON Lines, token arrays, directories and globs.
    Case(
        "JSON Lines line that is not JSON",
        lambda t, c: [f"data.path={_file(t, 'c.jsonl', NOT_JSON)}"],
        "c.jsonl: line 2 is not JSON (Expecting property name enclosed in double quotes)",
    ),
    Case(
        "JSON Lines record without the text field",
        lambda t, c: [f"data.path={_file(t, 'c.jsonl', NO_TEXT)}"],
        "c.jsonl: line 1 has no 'text' field (data.text_field); its keys: body",
    ),
    Case(
        "token array without data.vocab_size",
        lambda t, c: [f"data.path={_file(t, 't.bin', bytes(2000))}"],
        "data.vocab_size is required for the token array data.path=",
    ),
    Case(
        "token ids outside the vocabulary",
        lambda t, c: [
            f"data.path={_file(t, 't.bin', bytes(range(256)) * 8)}",
            "data.dtype=uint8",
            "data.vocab_size=100",
        ],
        "t.bin: token 100 has id 100, outside data.vocab_size=100 (ids 0..99)",
    ),
    Case(
        "token file not a whole number of ids",
        lambda t, c: [f"data.path={_file(t, 't.bin', bytes(2001))}", "data.vocab_size=100"],
        "t.bin: 2,001 bytes is not a whole number of data.dtype=uint16 ids (2 bytes each)",
    ),
    Case(
        "unknown token dtype",
        lambda t, c: ["data.dtype=float32"],
        "data.dtype=float32: choose from uint8, uint16, uint32",
    ),
    Case(
        ".npy token array not 1-D integers",
        lambda t, c: [f"data.path={_npy(t, 't.npy', np.zeros((40, 2)))}", "data.vocab_size=9"],
        "t.npy: holds a float64 array of shape (40, 2); pass a 1-D integer array of token ids",
    ),
    Case(
        "token array with text samples",
        lambda t, c: [
            f"data.path={_file(t, 't.bin', bytes(20000))}",
            "data.vocab_size=9",
            "trainer.sample_length=20",
        ],
        "holds token ids and no tokenizer to write samples as text",
    ),
    Case(
        "vocabulary size for text",
        lambda t, c: [f"data.path={_file(t, 'c.txt', b'x' * 9999)}", "data.vocab_size=100"],
        "data.vocab_size=100: not read by data.tokenizer=bytes; it is for data.tokenizer=word or bpe",
    ),
    Case(
        "glob that matches nothing",
        lambda t, c: [f"data.path={t}/*.nothing"],
        "*.nothing: the glob matches no file; check the pattern",
    ),
    Case(
        "directory with an unreadable file",
        lambda t, c: [f"data.path={_dir(t, 'd', {'a.txt': b'x' * 99, 'b/locked.txt': b'y'})}"],
        "d/b/locked.txt: cannot read (Permission denied)",
    ),
    Case(
        "directory with a token array",
        lambda t, c: [f"data.path={_dir(t, 'd', {'a.txt': b'x' * 99, 'b.bin': bytes(8)})}"],
        "b.bin is a token array; name it alone as data.path",
    ),
    Case(
        "unknown corpus reader",
        lambda t, c: ["data.reader=parquet"],
        "data.reader=parquet: choose from text, jsonl, bin, npy, or name your own as module:function",
    ),
    Case(
        "resume on a corpus that changed",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, _other_corpus)}"],
        "(sha256 000000000000); its content has changed since",
    ),
    # python -m seqtrain.sample and .evaluate keep the same promise for their arguments.
    Case(
        "sample length zero",
        lambda t, c: [f"ckpt={c}", "length=0"],
        "length=0: must be a positive",
        tool="sample",
    ),
    Case(
        "sample top_k above the vocabulary",
        lambda t, c: [f"ckpt={c}", "top_k=1000"],
        "top_k=1000: the vocabulary has 256 symbols",
        tool="sample",
    ),
    Case(
        "sample temperature NaN",
        lambda t, c: [f"ckpt={c}", "temperature=nan"],
        "temperature=nan: must be > 0 and finite",
        tool="sample",
    ),
    Case(
        "sample on CUDA without CUDA",
        lambda t, c: [f"ckpt={c}", "device=cuda"],
        "device=cuda: this machine has no CUDA GPU",
        tool="sample",
        needs_no_cuda=True,
    ),
    Case(
        "sample an unknown device",
        lambda t, c: [f"ckpt={c}", "device=abacus"],
        "device=abacus: choose from cpu, cuda",
        tool="sample",
    ),
    Case(
        "sample non-finite weights",
        lambda t, c: [f"ckpt={_checkpoint(t, c, _nan_weights)}"],
        "hold NaN or infinite values",
        tool="sample",
    ),
    Case(
        "sample a missing checkpoint",
        lambda t, c: ["ckpt=/no/such.ckpt"],
        "ckpt=/no/such.ckpt: no such file",
        tool="sample",
    ),
    Case(
        "sample without a checkpoint",
        lambda t, c: ["length=5"],
        "ckpt is required: ckpt=...",
        tool="sample",
    ),
    Case(
        "sample an unknown key",
        lambda t, c: [f"ckpt={c}", "lenght=5"],
        "lenght is not a key; this command takes",
        tool="sample",
    ),
    Case(
        "evaluate an unknown split",
        lambda t, c: [f"ckpt={c}", "split=dev"],
        "split=dev: choose from train, val, test",
        tool="evaluate",
    ),
    Case(
        "evaluate batch size zero",
        lambda t, c: [f"ckpt={c}", "batch_size=0"],
        "batch_size=0: must be a positive",
        tool="evaluate",
    ),
    Case(
        "evaluate on CUDA without CUDA",
        lambda t, c: [f"ckpt={c}", "device=cuda"],
        "device=cuda: this machine has no CUDA GPU",
        tool="evaluate",
        needs_no_cuda=True,
    ),
    Case(
        "evaluate non-finite weights",
        lambda t, c: [f"ckpt={_checkpoint(t, c, _nan_weights)}"],
        "hold NaN or infinite values",
        tool="evaluate",
    ),
    # Tokenizers (data.tokenizer): settings it cannot fit with, files it cannot read.
    Case(
        "unknown tokenizer",
        lambda t, c: ["data.tokenizer=wordpiece"],
        "data.tokenizer=wordpiece: choose from bytes, word, bpe",
    ),
    Case(
        "tokenizer plug-in that is not there",
        lambda t, c: ["data.tokenizer=no_such_module:Tok"],
        "data.tokenizer=no_such_module:Tok: cannot import module 'no_such_module'",
    ),
    Case(
        "word vocabulary below 3",
        lambda t, c: ["data.tokenizer=word", "data.vocab_size=2"],
        "data.vocab_size=2: data.tokenizer=word needs at least 3",
    ),
    Case(
        "bpe vocabulary below the byte alphabet",
        lambda t, c: ["data.tokenizer=bpe", "data.vocab_size=100"],
        "data.vocab_size=100: data.tokenizer=bpe needs a vocabulary of at least 256",
    ),
    Case(
        "bpe without a vocabulary size",
        lambda t, c: ["data.tokenizer=bpe"],
        "data.vocab_size=None: data.tokenizer=bpe needs a vocabulary of at least 256",
    ),
    Case(
        "missing tokenizer file",
        lambda t, c: ["data.tokenizer=bpe", "data.tokenizer_file=/no/such.json"],
        "data.tokenizer_file=/no/such.json: no such file",
    ),
    Case(
        "unreadable tokenizer file",
        lambda t, c: ["data.tokenizer=bpe", f"data.tokenizer_file={_file(t, 'locked.txt', b'{}')}"],
        "cannot read (Permission denied)",
    ),
    Case(
        "not a tokenizer file",
        lambda t, c: [
            "data.tokenizer=bpe",
            f"data.tokenizer_file={_file(t, 'tok.json', NOT_A_TOKENIZER)}",
        ],
        "not a tokenizer.json",
    ),
    Case(
        "min_count zero",
        lambda t, c: ["data.tokenizer=word", "data.min_count=0"],
        "data.min_count=0: must be a positive integer",
    ),
    Case(
        "tokenizer key the tokenizer does not read",
        lambda t, c: ["data.min_count=5"],
        "data.min_count=5: not read by data.tokenizer=bytes; it is for data.tokenizer=word",
    ),
    Case(
        "tokenizer on a series",
        lambda t, c: ["data.source=mackey_glass", "data.length=200", "data.tokenizer=word"],
        "data.tokenizer=word reads text, but data.source=mackey_glass gives float rows",
    ),
    # What is read is verified (issue #24): every key the user named is used or refused.
    Case(
        "corpus path that is a symlink loop",
        lambda t, c: [f"data.path={_loop(t)}"],
        "loop-a: is a symlink loop; point it at a file or folder",
    ),
    Case(
        "series targets with a text corpus",
        lambda t, c: [
            f"data.path={_file(t, 'c.txt', b'x' * 9999)}",
            f"data.target_path={_npy(t, 'y.npy', np.zeros((9, 1), np.float32))}",
        ],
        "y.npy: not read for a corpus of text (only data.source=series read it); drop it",
    ),
    Case(
        "document starts with a text corpus",
        lambda t, c: [
            f"data.path={_file(t, 'c.txt', b'x' * 9999)}",
            f"data.doc_starts_path={_npy(t, 'd.npy', np.array([0, 5]))}",
        ],
        "d.npy: not read for a corpus of text (only data.source=series and token arrays read it)",
    ),
    Case(
        "split that does not sum to 1",
        lambda t, c: ["data.split=[0.8,0.5,0.5]"],
        "data.split=[0.8, 0.5, 0.5]: the fractions sum to 1.8; they must sum to 1",
    ),
    Case(
        "empty corpus path (an unset variable)",
        lambda t, c: ["data.path="],
        "data.path='': is empty (an unset shell variable?); name a file or folder, or leave the key "
        "out",
    ),
    Case(
        "document starts out of order",
        lambda t, c: [
            f"data.path={_file(t, 't.bin', bytes(range(200)) * 50)}",
            "data.dtype=uint8",
            "data.vocab_size=256",
            f"data.doc_starts_path={_npy(t, 'd.npy', np.array([0, 900, 300]))}",
        ],
        "d.npy: must hold token offsets in increasing order (where each document starts, not "
        "the documents' lengths)",
    ),
    Case(
        "tokenizer file of three tokens",
        lambda t, c: [
            "data.tokenizer=bpe",
            f"data.tokenizer_file={_file(t, 'tok3.json', _three_tokens())}",
        ],
        "tok3.json: holds 3 tokens, under 16: no vocabulary to train a model on",
    ),
    Case(
        "series of zero variance",
        lambda t, c: [
            "task=regression",
            "data.source=series",
            f"data.path={_npy(t, 'flat.npy', np.ones((4000, 2), np.float32))}",
        ],
        "have zero variance: nMSE (MSE over the variance) is undefined",
    ),
    Case(
        "tokenizer plug-in without the protocol",
        lambda t, c: ["data.tokenizer=tests.plugins.bad_tokenizers:NoEncode"],
        "NoEncode lacks encode, decode of the tokenizer protocol",
    ),
    Case(
        "reader plug-in returning floats",
        lambda t, c: [
            f"data.path={_file(t, 'c.txt', b'x' * 9999)}",
            "data.reader=tests.plugins.bad_readers:floats",
        ],
        "data.reader=tests.plugins.bad_readers:floats: returned float32 values of shape (9999,)",
    ),
    Case(
        "unwritable token cache",
        lambda t, c: ["data.tokenizer=word", f"data.cache_dir={_file(t, 'afile', b'x')}"],
        "cannot write the tokenized corpus",
    ),
    Case(
        "resume with another tokenizer",
        _resume("data.tokenizer=word"),
        "data.tokenizer=bytes (now word)",
        _holds_run,
    ),
    Case(
        "evaluate with another tokenizer",
        lambda t, c: [f"ckpt={c}", "data.tokenizer=word"],
        "data.tokenizer: evaluate encodes with the checkpoint's own tokenizer",
        tool="evaluate",
    ),
    Case(
        "evaluate on a corpus that changed",
        lambda t, c: [f"ckpt={_checkpoint(t, c, _other_corpus)}"],
        "its content has changed since (sha256",
        tool="evaluate",
    ),
    Case(
        "evaluate a corpus that is no longer there",
        lambda t, c: [f"ckpt={_checkpoint(t, c, _moved_corpus)}"],
        "trained on data.path=/no/such/moved.txt, which is no longer there (moved or deleted?)",
        tool="evaluate",
    ),
    Case(
        "evaluate a moved corpus",
        lambda t, c: [f"ckpt={c}", "data.path=/no/such.txt"],
        "data.path=/no/such.txt: no such file",
        tool="evaluate",
    ),
]


def files(root: Path) -> dict[str, bytes]:
    """Every file under root and its bytes (Hydra's job log aside: it appends its own lines)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


TOOLS = {"seqtrain": cli.main, "sample": sample.main, "evaluate": evaluate.main}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(
    case: Case, trained, tmp_path, monkeypatch, capsys
) -> None:
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("an error only on a machine without CUDA")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("an: earlier run\n")
    if case.setup is not None:
        case.setup(run_dir, trained)
    before = files(run_dir)
    args = case.args(tmp_path, trained)
    if "unreadable" in case.name:  # root reads any file, so fake the permission error
        real = Path.open
        monkeypatch.setattr(
            Path,
            "open",
            lambda p, *a, **k: (
                (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                if p.name == "locked.txt"
                else real(p, *a, **k)
            ),
        )
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if case.tool == "seqtrain":
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={run_dir}")
        monkeypatch.setattr(sys, "argv", ["seqtrain", *TINY, *args])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    else:
        with pytest.raises(SystemExit) as exit_:
            TOOLS[case.tool](args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: ") and "\n" not in err, err
    assert case.message in err, err
    assert files(run_dir) == before  # nothing written, nothing overwritten
    assert not (run_dir / ".seqtrain.lock").exists() or case.setup in LOCKED
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_every_checked_group_and_every_tool_has_cases() -> None:
    """The table covers each config group with rules of its own and each command a user types
    (a group or a tool left without a case would have its refusals untested)."""
    groups = ("data", "model", "tbptt", "memory", "optim", "trainer", "resume", "seed")
    for group in groups:
        assert any(f"{group}." in c.message or f"{group}=" in c.message for c in CASES), group
    assert {c.tool for c in CASES} == set(TOOLS)
    assert len({c.name for c in CASES}) == len(CASES)  # one row each in docs/errors.md


def test_a_run_directory_with_checkpoints_is_not_overwritten(
    trained, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.parent, run_dir / "checkpoints")
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(sys, "argv", ["seqtrain", *TINY, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "already holds checkpoints; pass resume=auto" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_docs_table_lists_every_case() -> None:
    table = (ROOT / "docs" / "errors.md").read_text()
    for case in CASES:
        assert f"| {case.name} |" in table, case.name
        assert case.message in table, case.message


def test_full_traceback_only_when_asked(tmp_path, monkeypatch) -> None:
    from seqtrain.config import ConfigError

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    argv = ["seqtrain", *TINY, "tbptt.window=0", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ConfigError, match="tbptt.window=0"):
        cli.main()
