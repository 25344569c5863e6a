"""The optimizer and its LR schedule, built from config (`optim=adamw`, `optim=sgd`, your own).

The optimizer class and the schedule are `_target_` nodes (`_partial_: true`): the class gets its
parameter groups and the peak `optim.lr` here. Clipping, skipping non-finite updates and weight
decay on matrices only stay seqtrain's (the module clips by hand: Lightning's Trainer-level
clipping raises under manual optimisation).

A weight average (`optim.average`, `WeightAverage`) is kept beside any optimizer once its start
rule fires: `optim=ntasgd` is SGD with NT-ASGD's non-monotonic rule (docs/awd.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from seqtrain import targets
from seqtrain.errors import ConfigError
from seqtrain.registry import Registry

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
    # Average the weights once a rule fires; validation, best.ckpt, evaluate and sample then read
    # the average, training goes on with the raw weights. nt: NT-ASGD's non-monotonic rule
    # (optim=ntasgd); null: never; or your own rule as module:function.
    average: str | None = None
    nonmono: int = 5  # nt: start when val is worse than the best before the last nonmono passes

    def check(self, training: bool = True) -> None:
        """One-line errors for what would otherwise fail when training starts; `training`: say
        what training would change (a warmup longer than the run), not for a checkpoint's
        config that sample or evaluate read."""
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0 and finite")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be >= 0 and finite")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise ConfigError(f"optim.grad_clip={self.grad_clip}: must be > 0 and finite, or null")
        if self.max_skipped <= 0:
            raise ConfigError(f"optim.max_skipped={self.max_skipped}: must be a positive integer")
        if self.nonmono < 1:
            raise ConfigError(f"optim.nonmono={self.nonmono}: must be a positive number of passes")
        if self.average is not None:
            AVERAGE_STARTS.get(self.average)  # an unknown name is one line listing the rules
        for name in ("lr", "weight_decay"):
            if name in self.optimizer:
                raise ConfigError(f"optim.optimizer.{name}: seqtrain sets it; give optim.{name}")
        targets.check("optim.optimizer", self.optimizer, given=("params", "lr"))
        targets.check("optim.schedule", self.schedule, given=("optimizer",))
        check_built(self)
        if self.schedule["_target_"] == "seqtrain.optim.warmup_cosine":
            arguments = _arguments(self.schedule)
            warmup, steps = arguments["warmup_steps"], arguments["max_steps"]
            if training and effective_warmup(warmup, steps) != warmup:
                log.warning(
                    "optim.schedule.warmup_steps=%d >= trainer.max_steps=%d: the LR would never "
                    "reach optim.lr; warming up over %d updates instead",
                    warmup,
                    steps,
                    effective_warmup(warmup, steps),
                )


def check_built(optim: OptimConfig) -> None:
    """Build the optimizer on a dummy parameter and its schedule on that, as `build` will: the
    values only the class checks (betas, eps, momentum) and what a user's class or schedule
    returns are then one line before the run starts, not an error at the first update."""
    dummy = [{"params": [nn.Parameter(torch.zeros(1))], "weight_decay": optim.weight_decay}]
    optimizer = targets.call("optim.optimizer", optim.optimizer, dummy, lr=optim.lr)
    target = optim.optimizer["_target_"]
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optim.optimizer._target_={target}: built a {type(optimizer).__name__}, not a "
            "torch.optim.Optimizer"
        )
    schedule = targets.call("optim.schedule", optim.schedule, optimizer)
    if not isinstance(schedule, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(
            f"optim.schedule._target_={optim.schedule['_target_']}: built a "
            f"{type(schedule).__name__}, not a torch.optim.lr_scheduler.LRScheduler"
        )


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


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Every group's rate times `factor` for the steps inside, restored exactly afterwards: the
    schedule never sees it (tbptt.vary scales one update's step by its length / window)."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate


# optim.average -> when the weight average starts: a rule (validation losses so far, oldest
# first; optim.nonmono) -> bool, asked after every validation pass until it says yes.
AVERAGE_STARTS: Registry[Callable[[list[float], int], bool]] = Registry("optim.average")


@AVERAGE_STARTS.register("nt")
def non_monotonic(losses: list[float], nonmono: int) -> bool:
    """NT-ASGD's trigger (Merity et al. 2017; awd-lstm-lm's main.py): the newest loss is worse
    than the best of those before the last `nonmono` earlier ones, so the run has gone `nonmono`
    passes without beating it."""
    *before, newest = losses
    return len(before) > nonmono and newest > min(before[:-nonmono])


class WeightAverage:
    """The uniform mean of the weights after each update from the start on (Polyak averaging:
    torch.optim.ASGD's `ax` with t0 at the start, what NT-ASGD evaluates), kept beside any
    optimizer, which goes on training the raw weights.

    The module calls `validated` after each validation pass (the rule may start the average),
    `update` after each optimizer step, and `use_average` / `use_raw` around evaluation. The
    losses, the start step, the count and the mean are the whole state (`state_dict`): a resume
    before or after the start continues exactly.
    """

    def __init__(self, start: Callable[[list[float], int], bool] | None, nonmono: int) -> None:
        self.start, self.nonmono = start, nonmono
        self.losses: list[float] = []  # every validation loss, oldest first
        self.started_at: int | None = None  # the step whose weights began the mean
        self.count = 0  # updates averaged since
        self.mean: dict[str, Tensor] | None = None  # by parameter name
        self._raw: dict[str, Tensor] | None = None  # the training weights while the mean is in

    @property
    def enabled(self) -> bool:
        return self.start is not None

    @property
    def active(self) -> bool:
        return self.mean is not None

    def validated(self, loss: float, step: int, model: nn.Module) -> bool:
        """Record a validation loss; True if it starts the average (from the weights now)."""
        self.losses.append(loss)
        if self.start is None or self.active or not self.start(self.losses, self.nonmono):
            return False
        self.started_at = step
        self.mean = {name: p.detach().clone() for name, p in model.named_parameters()}
        return True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the weights after an optimizer step into the mean: mean += (w - mean) / count."""
        if self.mean is None:
            return
        self.count += 1
        for name, p in model.named_parameters():
            self.mean[name].lerp_(p, 1 / self.count)  # weight 1 (the first) copies w exactly

    @torch.no_grad()
    def use_average(self, model: nn.Module) -> None:
        """Put the mean into the model (once started); `use_raw` puts the weights back."""
        if self.mean is None or self._raw is not None:
            return
        self._raw = {name: p.detach().clone() for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.copy_(self.mean[name])

    @torch.no_grad()
    def use_raw(self, model: nn.Module) -> None:
        if self._raw is None:
            return
        for name, p in model.named_parameters():
            p.copy_(self._raw[name])
        self._raw = None

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The mean in the model inside the block (the raw weights if not started)."""
        self.use_average(model)
        try:
            yield
        finally:
            self.use_raw(model)

    def state_dict(self) -> dict:
        assert self._raw is None, "saving while the mean is in the model would save the mean"
        return {
            "losses": list(self.losses),
            "started_at": self.started_at,
            "count": self.count,
            "mean": self.mean,
        }

    def load_state_dict(self, state: dict | None, model: nn.Module) -> None:
        """A checkpoint's state (None: one written before averaging existed), on the model's
        devices."""
        if state is None:
            return
        self.losses, self.started_at = list(state["losses"]), state["started_at"]
        self.count, mean = state["count"], state["mean"]
        if mean is not None:
            mean = {name: mean[name].to(p) for name, p in model.named_parameters()}
        self.mean = mean


def build_average(optim: OptimConfig) -> WeightAverage:
    """The weight average optim.average asks for (with none it never starts)."""
    start = None if optim.average is None else AVERAGE_STARTS.get(optim.average)
    return WeightAverage(start, optim.nonmono)
