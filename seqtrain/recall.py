"""python -m seqtrain.recall ckpt=PATH: the copy task's recall accuracy and bits on fresh examples.

The task and its corpus are in synthetic.py; this tool needs only the checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from omegaconf import MISSING

from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.tool_args import fail, parse_key_values

# Only light imports up to here: torch loads once the arguments are parsed (--help at once).


def recall(model, lag: int, count: int = 512, seed: int = 12345) -> dict:  # noqa: ANN001
    """Accuracy and bits of the recalled symbol on fresh examples, prompted up to the cue.

    Each prompt starts from a zero state, as every example does in training (one document each).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from seqtrain import heads
    from seqtrain.synthetic import ALPHABET, copy_examples

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


@dataclass
class RecallArgs:
    ckpt: str = MISSING  # a checkpoint of a copy-task run
    examples: int = 512  # fresh examples to test
    device: str = "cpu"  # cpu | cuda


def main(argv: list[str] | None = None) -> None:
    try:
        args, _ = parse_key_values(sys.argv[1:] if argv is None else argv, RecallArgs, (), __doc__)
        from seqtrain.checkpoint import config_of, load_model, read  # torch loads here

        ckpt = read(args.ckpt)
        cfg = config_of(ckpt, {})
        if cfg.data.source != "copy":
            raise ConfigError(f"ckpt={args.ckpt}: not a copy-task run (data.source=copy)")
        model = load_model(ckpt, cfg).to(args.device)
        print(json.dumps(recall(model, cfg.data.lag, args.examples)))
    except SeqtrainError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
