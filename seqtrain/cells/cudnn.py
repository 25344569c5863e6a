"""The cudnn backend: ``nn.LSTM`` / ``nn.GRU`` with seqtrain's forward contract, plus
DropConnect on weight_hh. cuDNN on GPU; on CPU PyTorch's oneDNN (LSTM) or native fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells.base import Shapes, State, check_input, register
from seqtrain.cells.flat_weights import flat_weights

_OPTIONS = ("dropout", "weight_drop")
_LSTM_OPTIONS = (*_OPTIONS, "forget_bias", "proj_size")


class CudnnRecurrent(Shapes):
    """Subclassing keeps the fused kernel and nn.LSTM's exact parameter names; weight-drop hands
    the fused op a dropped copy of weight_hh, as AWD-LSTM does."""

    def _setup(self, cell: str, num_states: int, gates: int, weight_drop: float) -> None:
        self.cell, self.num_states, self.gates = cell, num_states, gates
        self.output_size = getattr(self, "proj_size", 0) or self.hidden_size
        self.weight_drop = weight_drop

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        shapes = self.state_shapes(x.shape[0])
        check_input(x, state, shapes)
        if state is None:
            state = tuple(x.new_zeros(s) for s in shapes)
        if state[0].dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            state = tuple(s.to(x.dtype) for s in state)
        weights, names = flat_weights(self)
        if self.training and self.weight_drop > 0:
            for k in range(self.num_layers):
                i = names.index(f"weight_hh_l{k}")
                weights[i] = F.dropout(weights[i], self.weight_drop, training=True)
        L, p = self.num_layers, self.dropout
        if self.num_states == 2:
            y, h, c = torch.lstm(x, state, weights, True, L, p, self.training, False, True)
            return y, (h, c)
        y, h = torch.gru(x, state[0], weights, True, L, p, self.training, False, True)
        return y, (h,)


class CudnnLSTM(CudnnRecurrent, nn.LSTM):
    """Fused LSTM; see CudnnRecurrent."""


class CudnnGRU(CudnnRecurrent, nn.GRU):
    """Fused GRU; see CudnnRecurrent."""


def add_forget_bias(module: nn.Module, num_layers: int, hidden_size: int, value: float) -> None:
    """TF-style forget-gate bias, added at init to bias_ih's f slice (gate order i, f, g, o)."""
    if value:
        with torch.no_grad():
            for k in range(num_layers):
                getattr(module, f"bias_ih_l{k}")[hidden_size : 2 * hidden_size] += value


@register("lstm", "cudnn", _LSTM_OPTIONS)
def build_lstm(cell: str, input_size: int, hidden: int, layers: int, opts: dict) -> nn.Module:
    proj = int(opts["proj_size"])
    module = CudnnLSTM(
        input_size, hidden, layers, batch_first=True, dropout=float(opts["dropout"]), proj_size=proj
    )
    module._setup(cell, 2, 4, float(opts["weight_drop"]))
    add_forget_bias(module, layers, hidden, float(opts["forget_bias"]))
    return module


@register("gru", "cudnn", _OPTIONS)
def build_gru(cell: str, input_size: int, hidden: int, layers: int, opts: dict) -> nn.Module:
    module = CudnnGRU(input_size, hidden, layers, batch_first=True, dropout=float(opts["dropout"]))
    module._setup(cell, 1, 3, float(opts["weight_drop"]))
    return module
