"""A user cell whose training steps are slow: TinyCell's arithmetic after a sleep of
SLOW_CELL_SECONDS (environment; 0 if unset) per time step with gradients on, so an update of a
long window takes many seconds while validation and sampling stay fast. A slow and a fast run
compute the same numbers: a stopped slow run resumes exactly into a fast reference."""

from __future__ import annotations

import os
import time

import torch
from my_cells import TinyCell
from torch import Tensor


class SlowCell(TinyCell):
    def forward(self, x: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        if torch.is_grad_enabled():  # training and its recomputation in backward
            time.sleep(float(os.environ.get("SLOW_CELL_SECONDS", "0")))
        return super().forward(x, state)
