"""Recurrent cells (LSTM, GRU) behind one parameter layout, with selectable backends.

Every backend registers its parameters directly on the returned module and names and shapes them
exactly like ``nn.LSTM`` / ``nn.GRU`` (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
``bias_hh_l{k}``, ``weight_hr_l{k}``; gate order i, f, g, o for LSTM and r, z, n for GRU; every
weight uniform in (-1/sqrt(H), 1/sqrt(H))), so a checkpoint moves between backends untouched.

Backends:
    cudnn    ``nn.LSTM`` / ``nn.GRU``: cuDNN on GPU, PyTorch's native fused kernel on CPU.

All modules are batch-first, ``forward(x: (B, T, I), state: State | None) -> (y, State)`` with
``y: (B, T, H_out)``; ``State`` is ``(h, c)`` for LSTM and ``(h,)`` for GRU, a plain tuple with
``h: (L, B, H_out)`` and ``c: (L, B, H)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("cudnn", "jit", "modular", "compile")
CELLS = ("lstm", "gru")
State = tuple[Tensor, ...]

# Option name -> value meaning "off". Every option defaults to off so that all backends build the
# same network as nn.LSTM / nn.GRU (forget_bias 0.0, not TF's 1.0, keeps the init identical).
OPTION_DEFAULTS: dict[str, object] = {
    "dropout": 0.0,
    "layernorm": False,
    "recurrent_dropout": 0.0,
    "variational": False,
    "weight_drop": 0.0,
    "zoneout": 0.0,
    "forget_bias": 0.0,
    "cell_clip": None,
    "peephole": False,
    "proj_size": 0,
}

# Which backend can run which option when it is on. "modular" is the reference and runs all.
SUPPORT: dict[str, tuple[str, ...]] = {
    "dropout": ("cudnn", "jit", "modular", "compile"),
    "layernorm": ("modular", "compile"),
    "recurrent_dropout": ("modular", "compile"),
    "variational": ("modular", "compile"),
    "weight_drop": ("cudnn", "jit", "modular", "compile"),
    "zoneout": ("modular", "compile"),
    "forget_bias": ("cudnn", "jit", "modular", "compile"),
    "cell_clip": ("modular", "compile"),
    "peephole": ("modular", "compile"),
    "proj_size": ("cudnn", "modular", "compile"),
}
# Options that only make sense with a cell state.
LSTM_ONLY = ("forget_bias", "cell_clip", "peephole", "proj_size")
_PROBABILITIES = ("dropout", "recurrent_dropout", "weight_drop", "zoneout")


def _active(name: str, value: object) -> bool:
    return value is not None and value != OPTION_DEFAULTS[name]


def check_options(backend: str, cell: str, num_layers: int, **options: object) -> None:
    """Reject a configuration no backend would run faithfully, with a one-line message.

    Raising at startup beats nn.LSTM's habit of warning (dropout with one layer) or silently
    running something else than what the config says.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"model.backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}"
        )
    if cell not in CELLS:
        raise ValueError(f"model.cell={cell!r} is unknown; choose one of {', '.join(CELLS)}")
    if num_layers < 1:
        raise ValueError(f"model.num_layers={num_layers} must be at least 1")
    for name in options:
        if name not in OPTION_DEFAULTS:
            raise ValueError(
                f"model.{name} is not a cell option; known: {', '.join(OPTION_DEFAULTS)}"
            )
    for name in _PROBABILITIES:
        p = float(options.get(name, 0.0) or 0.0)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.{name}={p} must be in [0, 1)")
    proj = int(options.get("proj_size", 0) or 0)
    if proj < 0:
        raise ValueError(f"model.proj_size={proj} must be >= 0")
    clip = options.get("cell_clip")
    if clip is not None and float(clip) <= 0:
        raise ValueError(f"model.cell_clip={clip} must be positive (or null for no clipping)")
    if float(options.get("dropout", 0.0) or 0.0) > 0 and num_layers == 1:
        raise ValueError(
            "model.dropout>0 with model.num_layers=1 does nothing (dropout acts between layers "
            "only); set dropout=0 or use the model's output dropout"
        )
    if options.get("variational") and not (
        float(options.get("dropout", 0.0) or 0.0) > 0
        or float(options.get("recurrent_dropout", 0.0) or 0.0) > 0
    ):
        raise ValueError(
            "model.variational=true has no effect without model.dropout or model.recurrent_dropout"
        )
    for name, value in options.items():
        if not _active(name, value):
            continue
        if cell == "gru" and name in LSTM_ONLY:
            raise ValueError(
                f"model.{name}={value} needs a cell state; it applies to cell 'lstm' only"
            )
        if backend not in SUPPORT[name]:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ValueError(
                f"model.{name}={shown} is not supported by backend {backend!r}; "
                f"backends that support it: {', '.join(SUPPORT[name])}"
            )


def _options(options: dict[str, object]) -> dict[str, object]:
    """Fill in defaults so every backend reads one complete option set."""
    full = dict(OPTION_DEFAULTS)
    full.update({k: v for k, v in options.items() if v is not None or k == "cell_clip"})
    return full


def _check_state(x: Tensor, state: State | None, n: int, shapes: list[tuple[int, ...]]) -> None:
    """Name the wrong dimension: a transposed batch (batch-first confusion) is the usual culprit."""
    if x.dim() != 3:
        raise ValueError(f"input must be (B, T, I) batch-first, got shape {tuple(x.shape)}")
    if state is None:
        return
    if not isinstance(state, tuple) or len(state) != n:
        raise ValueError(f"state must be a tuple of {n} tensor(s), got {type(state).__name__}")
    for k, (s, want) in enumerate(zip(state, shapes, strict=True)):
        if s.dim() != 3:
            raise ValueError(f"state[{k}] must be (num_layers, B, H), got shape {tuple(s.shape)}")
        names = ("num_layers", "batch", "hidden")
        for d in range(3):
            if s.shape[d] != want[d]:
                hint = " (is the input batch-first?)" if d == 1 else ""
                raise ValueError(
                    f"state[{k}] dimension {d} ({names[d]}) is {s.shape[d]} but should be "
                    f"{want[d]}{hint}; state shape {tuple(s.shape)}, input shape {tuple(x.shape)}"
                )


def _add_forget_bias(module: nn.Module, num_layers: int, hidden_size: int, value: float) -> None:
    """TF-style forget-gate bias, added at init to bias_ih's f slice (gate order i, f, g, o)."""
    if value:
        with torch.no_grad():
            for k in range(num_layers):
                getattr(module, f"bias_ih_l{k}")[hidden_size : 2 * hidden_size] += value


class CudnnRecurrent(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` with seqtrain's forward contract, plus DropConnect on weight_hh.

    Subclassing keeps the fused kernel (cuDNN / oneDNN) and nn.LSTM's exact parameter names;
    weight-drop hands the fused op a dropped copy of weight_hh, as AWD-LSTM does.
    """

    def _setup(self, cell: str, options: dict[str, object]) -> None:
        self.cell = cell
        self.weight_drop = float(options["weight_drop"])
        self.state_size = 2 if cell == "lstm" else 1

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B = x.shape[0]
        L, H = self.num_layers, self.hidden_size
        h_out = self.proj_size or H
        shapes = [(L, B, h_out), (L, B, H)][: self.state_size]
        _check_state(x, state, self.state_size, shapes)
        if state is None:
            state = tuple(x.new_zeros(s) for s in shapes)
        if state[0].dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            state = tuple(s.to(x.dtype) for s in state)
        weights = list(self._flat_weights)
        if self.training and self.weight_drop > 0:
            for k in range(L):
                i = self._flat_weights_names.index(f"weight_hh_l{k}")
                weights[i] = F.dropout(weights[i], self.weight_drop, training=True)
        if self.cell == "lstm":
            y, h, c = torch.lstm(
                x, state, weights, True, L, self.dropout, self.training, False, True
            )
            return y, (h, c)
        y, h = torch.gru(x, state[0], weights, True, L, self.dropout, self.training, False, True)
        return y, (h,)


class CudnnLSTM(CudnnRecurrent, nn.LSTM):
    """Fused LSTM; see CudnnRecurrent."""


class CudnnGRU(CudnnRecurrent, nn.GRU):
    """Fused GRU; see CudnnRecurrent."""


def _build_cudnn(
    cell: str, input_size: int, hidden_size: int, num_layers: int, opts: dict
) -> nn.Module:
    kwargs = dict(batch_first=True, dropout=float(opts["dropout"]))
    if cell == "lstm":
        module: CudnnRecurrent = CudnnLSTM(
            input_size, hidden_size, num_layers, proj_size=int(opts["proj_size"]), **kwargs
        )
    else:
        module = CudnnGRU(input_size, hidden_size, num_layers, **kwargs)
    module._setup(cell, opts)
    _add_forget_bias(module, num_layers, hidden_size, float(opts["forget_bias"]))
    return module


def build_recurrent(
    backend: str, cell: str, input_size: int, hidden_size: int, num_layers: int, **options: object
) -> nn.Module:
    """Build a batch-first recurrent stack; see the module docstring for the contract."""
    check_options(backend, cell, num_layers, **options)
    opts = _options(options)
    if backend == "cudnn":
        return _build_cudnn(cell, input_size, hidden_size, num_layers, opts)
    raise NotImplementedError(f"backend {backend!r} is not built yet")


def kernel_name(module: nn.Module, device: torch.device) -> str:
    """What actually runs, for the startup log (the backend name alone does not say it)."""
    device = torch.device(device)
    if isinstance(module, CudnnRecurrent):
        if device.type == "cuda":
            return "cuDNN" if torch.backends.cudnn.is_available() else "native fused"
        return "oneDNN/native fused"
    return "python"
