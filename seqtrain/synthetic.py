"""The copy task: a corpus whose only hard byte depends on one shown `lag` steps earlier.

Each example is one document of lag + 4 bytes:

    s . . . . . . . . . . . . . . . ? s \\n
    ^ shown    lag dots (filler)    ^ ^ recalled
                                    cue

`s` is drawn uniformly from ALPHABET (16 letters, 4 bits). Where `s` is first shown it is pure
chance for any model; every other byte but the recalled `s` follows from the position. The
recalled `s` needs the model to carry `s` across lag + 2 steps: a model trained with TBPTT windows
shorter than that never receives a gradient linking the two and stays at chance (1/16, 4 bits),
while full BPTT over windows that hold whole examples can learn it.

    python -m seqtrain +experiment=copy_task                      # train (data.synthetic=copy)
    python -m seqtrain.synthetic ckpt=outputs/.../last.ckpt       # recall accuracy and bits
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING

ALPHABET = b"abcdefghijklmnop"  # the symbols to remember: 16, so chance is 4 bits
FILLER, CUE, END = ord("."), ord("?"), ord("\n")
TASKS = ("copy",)


def example_length(lag: int) -> int:
    return lag + 4  # s, lag dots, ?, s, newline


def copy_examples(count: int, lag: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, lag + 4) uint8 examples and their (count,) symbols."""
    rng = np.random.default_rng(seed)
    symbols = np.frombuffer(ALPHABET, dtype=np.uint8)[rng.integers(0, len(ALPHABET), count)]
    out = np.full((count, example_length(lag)), FILLER, dtype=np.uint8)
    out[:, 0] = symbols
    out[:, -3] = CUE
    out[:, -2] = symbols
    out[:, -1] = END
    return out, symbols


def copy_corpus(num_bytes: int, lag: int, streams: int = 1, split: tuple = (1.0,), seed: int = 0):  # noqa: ANN201  (data.Corpus)
    """About num_bytes of examples, each one document (the state resets where it starts).

    Laid out for `streams` training streams: the training split is sized so that every stream
    starts on an example. Otherwise each stream would reset on a different step, and the engine,
    which cuts a window wherever any stream resets, would run every window as ~lag segments.
    """
    from seqtrain.data import Corpus

    length = example_length(lag)
    train = split[0] / sum(split)
    per_stream = max(1, round(num_bytes * train / streams / length)) * length  # L, whole examples
    train_bytes = streams * per_stream + 1  # a stream reads L inputs and one more target
    total = round(train_bytes / train)
    while round(total * train) != train_bytes:  # the split rounds: find the total that fits
        total += 1 if round(total * train) < train_bytes else -1
    examples, _ = copy_examples(math.ceil(total / length), lag, seed)
    starts = np.arange(0, total, length, dtype=np.int64)
    return Corpus(examples.reshape(-1)[:total], starts, f"copy-lag{lag}")


def load_synthetic(cfg):  # noqa: ANN001, ANN201  (data.DataConfig -> data.Corpus)
    from seqtrain.data import DataError

    if cfg.synthetic not in TASKS:
        raise DataError(
            f"data.synthetic={cfg.synthetic}: no such task; choose from {', '.join(TASKS)}"
        )
    if cfg.lag < 1:
        raise DataError(f"data.lag={cfg.lag}: must be a positive integer")
    if cfg.max_bytes is None:
        raise DataError("data.synthetic needs data.max_bytes: the size of the generated corpus")
    return copy_corpus(cfg.max_bytes, cfg.lag, cfg.batch_size, tuple(cfg.split))


@torch.no_grad()
def recall(model, lag: int, count: int = 512, seed: int = 12345) -> dict:  # noqa: ANN001
    """Accuracy and bits of the recalled symbol on fresh examples, prompted up to the cue.

    Each prompt starts from a zero state, as every example does in training (one document each).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples, symbols = copy_examples(count, lag, seed)
    x = torch.from_numpy(examples[:, :-2].astype(np.int64)).to(device)  # (N, lag + 2): s .. ?
    target = torch.from_numpy(symbols.astype(np.int64)).to(device)  # (N,)
    logits, _ = model(x)  # (N, lag + 2, V)
    last = logits[:, -1].float()  # (N, V): the prediction after the cue
    model.train(was_training)
    nats = F.cross_entropy(last, target).item()
    return {
        "lag": lag,
        "examples": count,
        "recall_accuracy": (last.argmax(-1) == target).float().mean().item(),
        "recall_bits": nats / math.log(2),
        "chance_accuracy": 1 / len(ALPHABET),
        "chance_bits": math.log2(len(ALPHABET)),
    }


@dataclass
class RecallArgs:
    ckpt: str = MISSING  # a checkpoint of a copy-task run
    examples: int = 512  # fresh examples to test
    device: str = "cpu"  # cpu | cuda


def main(argv: list[str] | None = None) -> None:
    from seqtrain.checkpoint import CheckpointError, config_of, load_model, read
    from seqtrain.cli import fail, parse_key_values
    from seqtrain.config import ConfigError

    try:
        args, _ = parse_key_values(sys.argv[1:] if argv is None else argv, RecallArgs)
        ckpt = read(args.ckpt)
        cfg = config_of(ckpt, {})
        if cfg.data.synthetic != "copy":
            raise ConfigError(f"ckpt={args.ckpt}: not a copy-task run (data.synthetic=copy)")
        model = load_model(ckpt, cfg).to(args.device)
        print(json.dumps(recall(model, cfg.data.lag, args.examples)))
    except (ConfigError, CheckpointError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
