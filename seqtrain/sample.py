"""python -m seqtrain.sample ckpt=PATH prompt="def " length=400: text from a checkpoint alone.

The prompt is encoded and the text decoded with the run's tokenizer, which the checkpoint holds.

Sampling is the language-model task's (tasks.py); a checkpoint of another task is a one-line
error that points to python -m seqtrain.evaluate.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from omegaconf import MISSING

from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.tool_args import fail, parse_key_values, plugin_failed

# Only light imports up to here: torch loads once the arguments are parsed (--help at once).


@dataclass
class SampleArgs:
    ckpt: str = MISSING  # a checkpoint written by training (checkpoints/last.ckpt, best.ckpt)
    prompt: str = "\n"  # text the model continues, encoded with the run's tokenizer
    length: int = 400  # tokens to generate (bytes with data.tokenizer=bytes, words with word)
    # tasks.SAMPLE_TEMPERATURE, as training's samples (tasks.py loads torch: written here too,
    # and tests/test_cli.py checks that the two agree)
    temperature: float = 0.8  # < 1 sharpens, > 1 flattens the distribution
    top_k: int | None = None  # sample only among the k most likely tokens; null = all
    seed: int = 0  # the same seed gives the same text
    device: str = "cpu"  # cpu | cuda


def sample(args: SampleArgs, overrides: dict) -> str:
    import torch

    from seqtrain.checkpoint import config_of, load_model, read, task_of

    ckpt = read(args.ckpt)
    cfg = config_of(ckpt, overrides)
    task = task_of(ckpt, cfg)
    if not task.generates_text:
        raise ConfigError(
            f"ckpt={args.ckpt} is a task.name={cfg.task.name} model: sampling is for language "
            "models (task=lm); python -m seqtrain.evaluate ckpt=... reports its figures"
        )
    vocab = task.spec.target_size
    if args.top_k is not None and args.top_k > vocab:
        raise ConfigError(
            f"top_k={args.top_k}: the vocabulary has {vocab} symbols; choose 1..{vocab}"
        )
    model = load_model(ckpt, cfg, args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    return task.generate(
        model,
        os.fsencode(args.prompt),  # bytes as given, valid UTF-8 or not: the tokenizer reads bytes
        args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=generator,
    )


def main(argv: list[str] | None = None) -> None:
    try:
        args, overrides = parse_key_values(
            sys.argv[1:] if argv is None else argv, SampleArgs, ("model",), __doc__
        )
        if args.length < 1:
            raise ConfigError(f"length={args.length}: must be a positive number of tokens")
        if not 0 < args.temperature < math.inf:
            raise ConfigError(f"temperature={args.temperature}: must be > 0 and finite")
        if args.top_k is not None and args.top_k < 1:
            raise ConfigError(f"top_k={args.top_k}: must be >= 1, or null for all")
        from seqtrain.checkpoint import check_device  # torch loads here

        check_device(args.device)
        if not args.prompt:
            raise ConfigError("prompt must not be empty; the model needs one byte to start from")
        print(sample(args, overrides))
    except SeqtrainError as err:
        fail(str(err))
    except Exception as err:  # a plug-in's own error: one line and its frame; a bug: traceback
        plugin_failed(err)
        raise


if __name__ == "__main__":
    main()
