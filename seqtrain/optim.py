"""The optimizer and its LR schedule, built from config (`optim=adamw`, `optim=sgd`, your own).

The optimizer class and the schedule are `_target_` nodes (`_partial_: true`): the class gets its
parameter groups and the peak `optim.lr` here. Clipping, skipping non-finite updates and weight
decay on matrices only stay seqtrain's (the module clips by hand: Lightning's Trainer-level
clipping raises under manual optimisation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from seqtrain import targets
from seqtrain.errors import ConfigError

log = logging.getLogger("seqtrain")


def adamw() -> dict[str, Any]:
    """The default optimizer node (conf/optim/adamw.yaml says the same; a test checks)."""
    return {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "betas": [0.9, 0.99],  # Adam moment decays; 0.99 suits small-batch char models
    }


@dataclass
class OptimConfig:
    # The optimizer class and its own arguments; it is given the parameter groups and optim.lr.
    # An option file (conf/optim/*.yaml) gives this node whole: optim=sgd keeps no AdamW keys.
    optimizer: dict[str, Any] = field(default_factory=adamw)
    lr: float = 2e-3  # peak learning rate (the schedule scales it)
    weight_decay: float = 0.0  # decoupled weight decay on matrices (not embeddings, biases)
    grad_clip: float | None = 1.0  # clip the global gradient norm (LSTMs explode without it)
    # The LR schedule, stepped once per update: linear warmup from 0 to lr over warmup_steps,
    # then cosine decay to lr * min_lr_ratio at trainer.max_steps.
    schedule: dict[str, Any] = field(
        default_factory=lambda: {
            "_target_": "seqtrain.optim.warmup_cosine",
            "_partial_": True,
            "warmup_steps": 100,
            "min_lr_ratio": 0.1,
            "max_steps": "${trainer.max_steps}",
        }
    )
    max_skipped: int = 10  # stop after this many consecutive non-finite updates (each skipped)


def lr_factor(step: int, warmup_steps: int, min_lr_ratio: float, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr_ratio + (1 - min_lr_ratio) * cosine


def effective_warmup(warmup_steps: int, max_steps: int) -> int:
    """The warmup a run gets: as configured, unless it would last the whole run.

    Warmup ending at or after trainer.max_steps never reaches optim.lr (a 50-step sweep with the
    default 100 peaked at half of it), so it is scaled to the first tenth of the run instead;
    check() says so once, before training.
    """
    return warmup_steps if warmup_steps < max_steps else max_steps // 10


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, min_lr_ratio: float, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """seqtrain's default schedule, as a scheduler over the optimizer's peak rates."""
    if warmup_steps < 0:
        raise ConfigError(f"optim.schedule.warmup_steps={warmup_steps}: must be >= 0")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"optim.schedule.min_lr_ratio={min_lr_ratio}: must be in [0, 1]")
    warmup = effective_warmup(warmup_steps, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, min_lr_ratio, max_steps)
    )


def check(optim: OptimConfig) -> None:
    """One-line errors for what would otherwise fail when training starts."""
    if not 0 < optim.lr < math.inf:
        raise ConfigError(f"optim.lr={optim.lr}: must be > 0 and finite")
    if not 0 <= optim.weight_decay < math.inf:
        raise ConfigError(f"optim.weight_decay={optim.weight_decay}: must be >= 0 and finite")
    if optim.grad_clip is not None and not 0 < optim.grad_clip < math.inf:
        raise ConfigError(f"optim.grad_clip={optim.grad_clip}: must be > 0 and finite, or null")
    if optim.max_skipped <= 0:
        raise ConfigError(f"optim.max_skipped={optim.max_skipped}: must be a positive integer")
    for name in ("lr", "weight_decay"):
        if name in optim.optimizer:
            raise ConfigError(f"optim.optimizer.{name}: seqtrain sets it; give optim.{name}")
    targets.check("optim.optimizer", optim.optimizer, given=("params", "lr"))
    targets.check("optim.schedule", optim.schedule, given=("optimizer",))
    if optim.schedule["_target_"] == "seqtrain.optim.warmup_cosine":
        arguments = _arguments(optim.schedule)
        warmup_cosine(torch.optim.SGD([torch.zeros(1)]), **arguments)
        warmup, steps = arguments["warmup_steps"], arguments["max_steps"]
        if effective_warmup(warmup, steps) != warmup:
            log.warning(
                "optim.schedule.warmup_steps=%d >= trainer.max_steps=%d: the LR would never reach "
                "optim.lr; warming up over %d updates instead",
                warmup,
                steps,
                effective_warmup(warmup, steps),
            )


def _arguments(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in targets.HYDRA_KEYS}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: embeddings, biases and gains are not shrunk."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def build(
    optim: OptimConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over the model's parameter groups, and its schedule."""
    groups = parameter_groups(model, optim.weight_decay)
    optimizer = targets.build(optim.optimizer)(groups, lr=optim.lr)
    return optimizer, targets.build(optim.schedule)(optimizer)


def upgrade(optim: dict[str, Any]) -> dict[str, Any]:
    """An optim config saved before optimizers were config nodes (betas, warmup_steps and
    min_lr_ratio at the top), in today's keys; a current one unchanged."""
    if "betas" not in optim:
        return optim
    old = dict(optim)
    node = {**adamw(), "betas": old.pop("betas")}
    schedule = OptimConfig().schedule
    for key in ("warmup_steps", "min_lr_ratio"):
        schedule[key] = old.pop(key, schedule[key])
    return {**old, "optimizer": node, "schedule": schedule}
