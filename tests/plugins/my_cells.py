"""A user's own cell, as a user would write it: seqtrain finds it as model.cell=my_cells:TinyCell
with this folder on PYTHONPATH. A "minimal gated unit" (one gate, Zhou et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyCell(nn.Module):
    num_states = 1  # h only

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, 2 * hidden_size)
        self.hh = nn.Linear(hidden_size, 2 * hidden_size, bias=False)

    def forward(self, x: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        (h,) = state  # (B, H)
        f_x, n_x = self.ih(x).chunk(2, 1)
        f_h, n_h = self.hh(h).chunk(2, 1)
        f = torch.sigmoid(f_x + f_h)
        n = torch.tanh(n_x + f * n_h)
        h = (1 - f) * h + f * n
        return h, (h,)


class TwoStateCell(nn.Module):
    """LSTM-like: a state of two tensors, (h, c)."""

    num_states = 2

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lin = nn.Linear(input_size + hidden_size, 4 * hidden_size)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = state
        i, f, g, o = self.lin(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class NoStates(nn.Module):
    """Breaks the protocol: no num_states."""
