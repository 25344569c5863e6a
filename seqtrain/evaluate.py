"""python -m seqtrain.evaluate ckpt=PATH: the task's stateful figures over a whole split (loss and
bpc for lm; loss, mse and nmse for regression).

The data options come from the checkpoint (override them, e.g. data.path=FILE), and so does the
model, whose backend can be swapped: a checkpoint trained with cudnn evaluates with modular.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import MISSING

from seqtrain.errors import CheckpointError, ConfigError, SeqtrainError
from seqtrain.tool_args import fail, parse_key_values, plugin_failed

# Only light imports up to here: torch loads once the arguments are parsed (--help at once).
if TYPE_CHECKING:
    from seqtrain.config import Config
    from seqtrain.data import Streams
    from seqtrain.model import RecurrentModel
    from seqtrain.tasks import Task


@dataclass
class EvaluateArgs:
    ckpt: str = MISSING  # a checkpoint written by training
    split: str = "test"  # train | val | test
    batch_size: int | None = None  # streams; null = the run's data.eval_batch_size
    device: str = "cpu"  # cpu | cuda


def evaluate_split(
    model: RecurrentModel, task: Task, streams: Streams, window: int, split: str, progress: bool
) -> dict:
    """Mean loss over every target of the split, state carried across windows, and the task's
    figures of it (bits per byte on the split's own bytes per token); `tokens` counts the target
    elements."""
    from tqdm import tqdm

    from seqtrain.tbptt import Engine

    engine = Engine(model, task, window)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for index in tqdm(range(len(streams)), desc="evaluate", disable=not progress, unit="win"):
        w = streams[index]
        w.inputs, w.targets, w.resets = (t.to(device) for t in (w.inputs, w.targets, w.resets))
        loss, n = engine.eval_window(w)
        total, count = total + loss, count + n
    return {"loss": total / count, **task.figures(total / count, split), "tokens": count}


def check_still_there(cfg: Config, path: str) -> None:
    """The corpus the checkpoint was trained on must still be where it was (data.path resolved
    at training); a glob may match other files now, and is left to the identity check."""
    where = cfg.data.path
    if where is not None and not Path(where).exists() and not any(c in where for c in "*?["):
        raise CheckpointError(
            f"ckpt={path} was trained on data.path={where}, which is no longer there (moved or "
            "deleted?); pass data.path=FILE to evaluate on it where it is now"
        )


def evaluate(args: EvaluateArgs, overrides: dict) -> dict:
    import torch

    from seqtrain.checkpoint import check_corpus, config_of, load_model, read, spec_of
    from seqtrain.data import TOKENIZER_KEYS, Streams, load_splits
    from seqtrain.memory import cache_host_memory
    from seqtrain.tasks import build_task

    given = [f"data.{k}" for k in ("tokenizer", *TOKENIZER_KEYS) if k in overrides.get("data", {})]
    if given:  # the weights read the checkpoint's tokens: its tokenizer is the only one
        raise ConfigError(
            f"{given[0]}: evaluate encodes with the checkpoint's own tokenizer, which the model "
            "was trained on; drop the override"
        )
    ckpt = read(args.ckpt)
    cfg = config_of(ckpt, overrides)
    if cfg.memory.host_cache:
        cache_host_memory()
    model = load_model(ckpt, cfg, args.device)
    batch = args.batch_size or cfg.data.eval_batch_size
    saved = spec_of(ckpt)  # the run's tokenizer and the training split's figures (nMSE's variance)
    trained_on = "data" not in overrides  # else the command line names other text itself
    if trained_on:
        check_still_there(cfg, args.ckpt)
    remedy = "pass data.path=FILE (or another data.* key) to evaluate on other text anyway"
    data = load_splits(
        cfg.data,
        {args.split: batch},
        cfg.tbptt.window,
        saved,
        (lambda identity: check_corpus(ckpt, identity, args.ckpt, remedy)) if trained_on else None,
    )
    # Bits per byte on the bytes per token of the data read now (data.path may be overridden).
    task = build_task(
        cfg.task, dataclasses.replace(saved, bytes_per_token=data.spec.bytes_per_token)
    )
    streams = Streams(data.parts[args.split], data.streams[args.split], cfg.tbptt.window)
    with torch.inference_mode():
        result = evaluate_split(
            model, task, streams, cfg.tbptt.window, args.split, sys.stderr.isatty()
        )
    return {"split": args.split, "backend": cfg.model.backend, **result}


def main(argv: list[str] | None = None) -> None:
    try:
        args, overrides = parse_key_values(
            sys.argv[1:] if argv is None else argv,
            EvaluateArgs,
            ("model", "data", "tbptt"),
            __doc__,
        )
        from seqtrain.checkpoint import check_device  # torch loads here
        from seqtrain.data import SPLITS

        if args.split not in SPLITS:
            raise ConfigError(f"split={args.split}: choose from {', '.join(SPLITS)}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"batch_size={args.batch_size}: must be a positive integer")
        check_device(args.device)
        print(json.dumps(evaluate(args, overrides)))
    except SeqtrainError as err:
        fail(str(err))
    except Exception as err:  # a plug-in's own error: one line and its frame; a bug: traceback
        plugin_failed(err)
        raise


if __name__ == "__main__":
    main()
