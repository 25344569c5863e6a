"""A user's own task, outside seqtrain: python -m seqtrain task.name=my_tasks:MeanAbsolute
(with this directory on PYTHONPATH). docs/tasks.md walks through it."""

from __future__ import annotations

from torch import Tensor

from seqtrain.tasks import Regression


class MeanAbsolute(Regression):
    """Regression trained and judged by the mean absolute error instead of the squared one."""

    monitor = "mae"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.float() - targets).abs().sum()  # summed; the engine takes the mean

    def metrics(self, loss: float) -> dict[str, float]:
        return {"mae": loss}
