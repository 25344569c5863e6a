"""python -m seqtrain.evaluate ckpt=PATH: the task's stateful figures over a whole split (loss and
bpc for lm; loss, mse and nmse for regression).

The data options come from the checkpoint (override them, e.g. data.path=FILE), and so does the
model, whose backend can be swapped: a checkpoint trained with cudnn evaluates with modular.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from tqdm import tqdm

from seqtrain.checkpoint import check_device, config_of, load_model, read, task_of
from seqtrain.cli import fail, parse_key_values
from seqtrain.data import (
    SPLITS,
    Streams,
    load_corpus,
    require_tokens,
    split_corpus,
    with_targets,
)
from seqtrain.errors import ConfigError, SeqtrainError
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


def evaluate(args: EvaluateArgs, overrides: dict) -> dict:
    ckpt = read(args.ckpt)
    cfg = config_of(ckpt, overrides)
    if cfg.memory.host_cache:
        cache_host_memory()
    model = load_model(ckpt, cfg).to(args.device)
    task = task_of(ckpt, cfg)  # the training split's figures (nMSE's variance) come with it
    splits = split_corpus(load_corpus(cfg.data), cfg.data.split)
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
