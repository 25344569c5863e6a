"""python -m seqtrain.recall ckpt=PATH: recall accuracy and bits on fresh examples of the task the
checkpoint was trained on: the copy task (data.source=copy) or MQAR (data.source=mqar).

The tasks and their corpora are in data/synthetic.py; this tool needs only the checkpoint. Each
source with a recall figure registers its scorer in SCORERS.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import MISSING

from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.tool_args import fail, parse_key_values

# Only light imports up to here: torch loads once the arguments are parsed (--help at once).
if TYPE_CHECKING:
    from seqtrain.data import DataConfig
    from seqtrain.data.synthetic import Mqar


def recall(model, lag: int, count: int = 512, seed: int = 12345) -> dict:
    """Accuracy and bits of the recalled symbol on fresh examples, prompted up to the cue.

    Each prompt starts from a zero state, as every example does in training (one document each).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from seqtrain import heads
    from seqtrain.data.synthetic import ALPHABET, copy_examples

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples, symbols = copy_examples(count, lag, seed)
    x = torch.from_numpy(examples[:, :-2].astype(np.int64)).to(device)  # (N, lag + 2): s .. ?
    target = torch.from_numpy(symbols.astype(np.int64)).to(device)  # (N,)
    with torch.no_grad():
        outputs, _ = model(x)  # (N, lag + 2, V) logits, or a head's outputs
    last = heads.scores(outputs)[:, -1].float()  # (N, V): the prediction after the cue
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


def mqar_recall(model, task: Mqar, count: int = 512, seed: int = 12345) -> dict:
    """Accuracy and bits of every queried value on fresh examples, each from a zero state.

    The whole example runs as one sequence, the state carried from window to window as training
    with tbptt.carry=true carries it; the model predicts each value from its queried key.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from seqtrain import heads
    from seqtrain.data.synthetic import VALUES

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples, answers = task.examples(count, seed)
    end = task.queries[-1] + 1  # the prompt ends at the last queried key
    x = torch.from_numpy(examples[:, :end].astype(np.int64)).to(device)  # (N, end)
    target = torch.from_numpy(answers.astype(np.int64)).to(device)  # (N, P)
    with torch.no_grad():
        outputs, _ = model(x)  # (N, end, V) logits, or a head's outputs
    asked = heads.scores(outputs)[:, torch.from_numpy(task.queries)].float()  # (N, P, V)
    model.train(was_training)
    nats = F.cross_entropy(asked.flatten(0, 1), target.flatten()).item()
    return {
        "pairs": task.pairs,
        "gap": task.gap,
        "window": task.window,
        "examples": count,
        "recall_accuracy": (asked.argmax(-1) == target).float().mean().item(),
        "recall_bits": nats / math.log(2),
        "chance_accuracy": 1 / len(VALUES),
        "chance_bits": math.log2(len(VALUES)),
    }


# data.source -> its recall figure on a checkpoint's model: (model, data config, examples) -> dict
SCORERS: dict[str, Callable[..., dict]] = {
    "copy": lambda model, data, count: recall(model, data.lag, count),
    "mqar": lambda model, data, count: mqar_recall(model, mqar_task(data), count),
}


def mqar_task(data: DataConfig) -> Mqar:
    from seqtrain.data.synthetic import Mqar

    return Mqar(data.pairs, data.gap, data.window)


def score(model, data: DataConfig, count: int) -> dict:
    """The recall figure of the task `data` generates."""
    return SCORERS[data.source](model, data, count)


@dataclass
class RecallArgs:
    ckpt: str = MISSING  # a checkpoint of a copy-task or MQAR run
    examples: int = 512  # fresh examples to test
    device: str = "cpu"  # cpu | cuda


def main(argv: list[str] | None = None) -> None:
    try:
        args, _ = parse_key_values(sys.argv[1:] if argv is None else argv, RecallArgs, (), __doc__)
        from seqtrain.checkpoint import config_of, load_model, read  # torch loads here

        ckpt = read(args.ckpt)
        cfg = config_of(ckpt, {})
        if cfg.data.source not in SCORERS:
            raise ConfigError(
                f"ckpt={args.ckpt}: data.source={cfg.data.source} has no recall figure; "
                f"it is for runs of data.source={' or '.join(SCORERS)}"
            )
        model = load_model(ckpt, cfg, args.device)
        print(json.dumps(score(model, cfg.data, args.examples)))
    except SeqtrainError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
