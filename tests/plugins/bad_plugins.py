"""Plug-ins with the mistakes a user's own can make, for tests/test_plugin_checks.py: each must be
refused in one line when it is built (its own error: one line and its frame), before any work."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from seqtrain.tasks import Regression, Task

# --- cells (model.cell=tests.plugins.bad_plugins:NAME)


class Wide(nn.Module):
    """Returns an h twice as wide as hidden_size."""

    num_states = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_size + hidden_size, 2 * hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        h = torch.tanh(self.lin(torch.cat([x, state[0]], 1)))  # (B, 2H)
        return h, (h,)


class OneState(nn.Module):
    """Declares two state tensors (h, c) but returns only h."""

    num_states = 2

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_size + hidden_size, hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        h = torch.tanh(self.lin(torch.cat([x, state[0]], 1)))  # (B, H)
        return h, (h,)


class Buggy(nn.Module):
    """A bug in its own forward: a plain Python exception, raised by the probe."""

    num_states = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_size, hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        raise ZeroDivisionError("the cell's own bug")


class Flaky(nn.Module):
    """Trains, then fails in the tools: raises in forward while $FLAKY_CELL is set."""

    num_states = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_size + hidden_size, hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        if os.environ.get("FLAKY_CELL"):
            raise RuntimeError("flaky")
        h = torch.tanh(self.lin(torch.cat([x, state[0]], 1)))  # (B, H)
        return h, (h,)


# --- tasks (task.name=tests.plugins.bad_plugins:NAME, with a series corpus)


class Unfinished(Task):
    """Says what it reads and what it is judged by, and nothing else of the protocol."""

    kind = "series"
    monitor = "mse"


class NoKind(Regression):
    """Says nothing of the data it reads."""

    kind = None  # type: ignore[assignment]


class UnloggedMonitor(Regression):
    """Picks best.ckpt by a figure it never logs."""

    monitor = "mae"


class VectorLoss(Regression):
    """Returns the per-element squared errors, not their sum."""

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.float() - targets).square()


# --- callbacks and loggers (+callbacks.x._target_=..., +logger.x._target_=...)


class NotACallback:
    """A plain class named as a callback."""


class NotALogger:
    """A plain class named as a logger."""

    def __init__(self, save_dir: str) -> None:
        self.save_dir = save_dir


# --- an LR schedule (optim.schedule._target_=...)


def no_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, min_lr_ratio: float, max_steps: int
) -> None:
    """Takes warmup_cosine's arguments, but forgets to return the scheduler it builds."""
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
