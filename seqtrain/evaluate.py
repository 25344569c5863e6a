"""python -m seqtrain.evaluate ckpt=PATH: stateful loss and bpc over a whole split.

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

from seqtrain.checkpoint import config_of, load_model, read
from seqtrain.cli import fail, parse_key_values
from seqtrain.data import SPLITS, Streams, load_corpus, require_tokens, split_corpus
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.memory import cache_host_memory
from seqtrain.model import RecurrentLM
from seqtrain.tbptt import Engine, bits


@dataclass
class EvaluateArgs:
    ckpt: str = MISSING  # a checkpoint written by training
    split: str = "test"  # train | val | test
    batch_size: int | None = None  # streams; null = the run's data.eval_batch_size
    device: str = "cpu"  # cpu | cuda


def evaluate_split(model: RecurrentLM, streams: Streams, window: int, progress: bool) -> dict:
    """Mean loss over every target of the split, state carried across windows."""
    engine = Engine(model, window)
    device = next(model.parameters()).device
    nats, tokens = 0.0, 0
    for index in tqdm(range(len(streams)), desc="evaluate", disable=not progress, unit="win"):
        w = streams[index]
        w.inputs, w.targets, w.resets = (t.to(device) for t in (w.inputs, w.targets, w.resets))
        loss, count = engine.eval_window(w)
        nats, tokens = nats + loss, tokens + count
    return {"loss": nats / tokens, "bpc": bits(nats / tokens), "tokens": tokens}


def evaluate(args: EvaluateArgs, overrides: dict) -> dict:
    ckpt = read(args.ckpt)
    cfg = config_of(ckpt, overrides)
    if cfg.memory.host_cache:
        cache_host_memory()
    model = load_model(ckpt, cfg).to(args.device)
    splits = split_corpus(load_corpus(cfg.data), cfg.data.split)
    batch = args.batch_size or cfg.data.eval_batch_size
    require_tokens(splits, {args.split: batch}, cfg.tbptt.window)
    streams = Streams(splits[args.split], batch, cfg.tbptt.window)
    with torch.inference_mode():
        result = evaluate_split(model, streams, cfg.tbptt.window, sys.stderr.isatty())
    return {"split": args.split, "backend": cfg.model.backend, **result}


def main(argv: list[str] | None = None) -> None:
    try:
        args, overrides = parse_key_values(
            sys.argv[1:] if argv is None else argv, EvaluateArgs, ("model", "data", "tbptt")
        )
        if args.split not in SPLITS:
            raise ConfigError(f"split={args.split}: choose from {', '.join(SPLITS)}")
        print(json.dumps(evaluate(args, overrides)))
    except SeqtrainError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
