"""python -m seqtrain.evaluate ckpt=PATH: the task's stateful figures over a whole split (loss and
bpc for lm; loss, mse and nmse for regression).

The data options come from the checkpoint (override them, e.g. data.path=FILE), and so does the
model, whose backend can be swapped: a checkpoint trained with cudnn evaluates with modular.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING
from tqdm import tqdm

from seqtrain.checkpoint import (
    check_corpus,
    check_device,
    config_of,
    load_model,
    read,
    task_of,
)
from seqtrain.cli import fail, parse_key_values
from seqtrain.config import Config
from seqtrain.corpora import fingerprint
from seqtrain.data import (
    SPLITS,
    Corpus,
    Streams,
    load_corpus,
    require_tokens,
    split_corpus,
    with_targets,
)
from seqtrain.errors import CheckpointError, ConfigError, SeqtrainError
from seqtrain.memory import cache_host_memory
from seqtrain.model import RecurrentModel
from seqtrain.tasks import Task
from seqtrain.tbptt import Engine


@dataclass
class EvaluateArgs:
    ckpt: str = MISSING  # a checkpoint written by training
    split: str = "test"  # train | val | test
    batch_size: int | None = None  # streams; null = the run's data.eval_batch_size
    device: str = "cpu"  # cpu | cuda


def evaluate_split(
    model: RecurrentModel, task: Task, streams: Streams, window: int, progress: bool
) -> dict:
    """Mean loss over every target of the split, state carried across windows, and the task's
    figures of it; `tokens` counts the target elements."""
    engine = Engine(model, task, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for index in tqdm(range(len(streams)), desc="evaluate", disable=not progress, unit="win"):
        w = streams[index]
        w.inputs, w.targets, w.resets = (t.to(device) for t in (w.inputs, w.targets, w.resets))
        loss, n = engine.eval_window(w)
        total, count = total + loss, count + n
    return {"loss": total / count, **task.metrics(total / count), "tokens": count}


def trained_corpus(ckpt: dict, cfg: Config, path: str, chosen: bool) -> Corpus:
    """The corpus to evaluate on: the one the checkpoint was trained on, which must still be
    where it was and as it was, unless the command line names data.* itself (other text)."""
    if chosen:
        return load_corpus(cfg.data)
    where = cfg.data.path
    if where is not None and not Path(where).exists() and not any(c in where for c in "*?["):
        raise CheckpointError(
            f"ckpt={path} was trained on data.path={where}, which is no longer there (moved or "
            "deleted?); pass data.path=FILE to evaluate on it where it is now"
        )
    corpus = load_corpus(cfg.data)
    remedy = "pass data.path=FILE (or another data.* key) to evaluate on other text anyway"
    check_corpus(ckpt, fingerprint(corpus), path, remedy)
    return corpus


def evaluate(args: EvaluateArgs, overrides: dict) -> dict:
    ckpt = read(args.ckpt)
    cfg = config_of(ckpt, overrides)
    if cfg.memory.host_cache:
        cache_host_memory()
    model = load_model(ckpt, cfg).to(args.device)
    task = task_of(ckpt, cfg)  # the training split's figures (nMSE's variance) come with it
    splits = split_corpus(trained_corpus(ckpt, cfg, args.ckpt, "data" in overrides), cfg.data.split)
    batch = args.batch_size or cfg.data.eval_batch_size
    require_tokens(splits, {args.split: batch}, cfg.tbptt.window)
    split = with_targets(splits[args.split], cfg.data.target_columns)
    streams = Streams(split, batch, cfg.tbptt.window)
    with torch.inference_mode():
        result = evaluate_split(model, task, streams, cfg.tbptt.window, sys.stderr.isatty())
    return {"split": args.split, "backend": cfg.model.backend, **result}


def main(argv: list[str] | None = None) -> None:
    try:
        args, overrides = parse_key_values(
            sys.argv[1:] if argv is None else argv, EvaluateArgs, ("model", "data", "tbptt")
        )
        if args.split not in SPLITS:
            raise ConfigError(f"split={args.split}: choose from {', '.join(SPLITS)}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"batch_size={args.batch_size}: must be a positive integer")
        check_device(args.device)
        print(json.dumps(evaluate(args, overrides)))
    except SeqtrainError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
