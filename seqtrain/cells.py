"""Recurrent cells (LSTM, GRU) behind one parameter layout, with selectable backends.

Every backend registers its parameters directly on the returned module and names and shapes them
exactly like ``nn.LSTM`` / ``nn.GRU`` (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
``bias_hh_l{k}``, ``weight_hr_l{k}``; gate order i, f, g, o for LSTM and r, z, n for GRU; every
weight uniform in (-1/sqrt(H), 1/sqrt(H))), so a checkpoint moves between backends untouched.

Backends (docs/cells.md has the option matrix and the measured speed):
    cudnn    ``nn.LSTM`` / ``nn.GRU``: cuDNN on GPU, oneDNN / PyTorch's native fused kernel on CPU.
    jit      fused time loops with a hand-written backward, scripted by TorchScript (deprecated).
    modular  plain PyTorch cell -> layer -> stack, every option; the fused loops when no option
             needs per-step autograd.
    compile  modular with the per-step cell math under torch.compile.

All modules are batch-first, ``forward(x: (B, T, I), state: State | None) -> (y, State)`` with
``y: (B, T, H_out)``; ``State`` is ``(h, c)`` for LSTM and ``(h,)`` for GRU, a plain tuple with
``h: (L, B, H_out)`` and ``c: (L, B, H)``.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("cudnn", "jit", "modular", "compile")
CELLS = ("lstm", "gru")
State = tuple[Tensor, ...]

log = logging.getLogger(__name__)

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
    "variational": ("jit", "modular", "compile"),
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


# ---------------------------------------------------------------------------------------------
# Fused time loops with a hand-written backward (modular and jit backends, options that allow it).
#
# Why: autograd through a Python time loop records ~10 nodes per step and accumulates dW_hh with T
# small matrix products that each read and write the whole (G*H, H) gradient. Here the forward
# keeps only activated gates and cell states, the backward computes every factor that does not
# depend on the recurrence for all steps at once, loops over time with ~5 ops per step, and forms
# dW_hh, dW_ih and the biases after the loop as single (T*B)-deep matrix products.
# The loops are TorchScript-compatible so the jit backend scripts the very same code.
# ---------------------------------------------------------------------------------------------


def _mm_t(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) @ w (N, K)^T, both contiguous; w plain or packed by _pack."""
    if w.is_mkldnn or _onednn(x):  # the first test is the cheap one, for the per-step products
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return x.mm(w.t())


# TorchScript cannot call oneDNN's op, so the jit loops call back into Python for it; it reads the
# signature from real types, not the strings `from __future__ import annotations` leaves.
_mm_t.__annotations__ = {"x": Tensor, "w": Tensor, "return": Tensor}
_mm_t = torch.jit.ignore(_mm_t)


# The oneDNN paths below (GEMM, weight packing, inner-product backward) were measured on x86 only;
# aarch64 builds route these ops through the Arm Compute Library, with other support and speed.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def _onednn_enabled() -> bool:
    return _X86 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _onednn(x: Tensor) -> bool:
    """Use oneDNN's GEMM, the one nn.LSTM's fused kernel uses, on CPU in float32: on the AMD EPYC
    these benchmarks ran on it does 310-500 GFLOP/s where torch.mm (MKL) does 110-210, for the
    (T*B)-deep products and the (B, H) steps alike."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _onednn_enabled()


def _pack(w: Tensor, rows: int) -> Tensor:
    """w (N, K) in oneDNN's blocked layout, for _mm_t's products with (rows, K) inputs.

    Done once per window: given the plain layout, oneDNN reorders w at every call, and the
    per-step products then run at 190-250 GFLOP/s instead of 350-450 (B 32, H 256-512, here).
    """
    if _onednn(w):
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    return w


def _input_grad(needed: bool, d: Tensor, w: Tensor, T: int, B: int) -> Tensor | None:
    """d (T*B, G) @ w (G, I) -> (T, B, I): a window input's gradient, None when not needed."""
    if not needed:
        return None
    dx = _mm_t(d, w.t().contiguous()) if _onednn(d) else d.mm(w)
    return dx.view(T, B, -1)


def _linear_grads(d: Tensor, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The weight gradients d^T x (G, K) of each input x (N, K), and the bias gradient d.sum(0),
    for a gradient d (N, G) of x W^T + b, N = T*B.

    On CPU this is oneDNN's inner-product backward, the one nn.Linear's oneDNN path runs: it reads
    d as it is. A transposed copy of d for _mm_t took as long as the product itself (the rows are
    a power of two floats long), and torch.mm's transposed product runs at half the speed.
    """
    if not _onednn(d):
        return [d.t().mm(x) for x in xs], d.sum(0)
    dm = d.to_mkldnn()
    grads = [
        # Only the shape of the third argument (the weight) is read.
        torch.ops.aten.mkldnn_linear_backward_weights(
            dm, x.to_mkldnn(), d.new_empty((d.shape[1], x.shape[1])), k == 0
        )
        for k, x in enumerate(xs)
    ]
    return [g[0] for g in grads], grads[0][1]


def _double_g(w: Tensor) -> Tensor:
    """A copy of w (4H, ...) with the g gate's rows doubled, for the LSTM loops below.

    They take tanh(a) as 2 sigmoid(2a) - 1, so that one sigmoid activates all four gates:
    torch.tanh runs 10x slower than torch.sigmoid on the CPU builds measured here (1.0 against
    0.1 ms per million floats).
    """
    H = w.shape[0] // 4
    w = w.clone()
    w[2 * H : 3 * H] *= 2
    return w


def _lstm_forward_loop(
    gates: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the recurrence in place: gates (T, B, 4H) holds x W_ih^T + b on entry, i f g o after.

    The g gate's pre-activations come doubled (_double_g on W_ih, b and w_hh). Returns the
    gates, the cell states C, their tanh and the outputs Hs, each (T, B, H).
    """
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    cs = gates.new_empty((T, B, H))
    tcs = gates.new_empty((T, B, H))
    hs = gates.new_empty((T, B, H))
    # Per-step views made in one call each: slicing inside the loop costs an op per slice.
    g_t, i_t, f_t = gates.unbind(0), gates[:, :, :H].unbind(0), gates[:, :, H : 2 * H].unbind(0)
    gg_t, o_t = gates[:, :, 2 * H : 3 * H].unbind(0), gates[:, :, 3 * H :].unbind(0)
    c_t, tc_t, h_t = cs.unbind(0), tcs.unbind(0), hs.unbind(0)
    h, c = h0, c0
    for t in range(T):
        g_t[t].add_(_mm_t(h, w_hh)).sigmoid_()  # (B, 4H)
        gg_t[t].mul_(2).sub_(1)  # tanh
        torch.mul(f_t[t], c, out=c_t[t])
        c_t[t].addcmul_(i_t[t], gg_t[t])
        torch.tanh(c_t[t], out=tc_t[t])
        torch.mul(tc_t[t], o_t[t], out=h_t[t])
        h, c = h_t[t], c_t[t]
    return gates, cs, tcs, hs


def _lstm_backward_factors(
    gates: Tensor, cs: Tensor, tcs: Tensor, c0: Tensor
) -> tuple[Tensor, Tensor]:
    """The backward factors that do not depend on the recurrence, for all steps at once, written
    into one buffer: d(i f g) = dc * k[:, :, :3] (T, B, 3, H), d(o) = dh * k[:, :, 3], and
    dc += dh * k_c.

    tcs is tanh of what the output gate multiplies: tanh(c), or tanh(LN(c)) when layer-normed.
    """
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    i, f, g, o = gates.chunk(4, 2)  # each (T, B, H)
    k = gates.new_empty((T, B, 4, H))
    torch.addcmul(i, i, i, value=-1, out=k[:, :, 0]).mul_(g)  # i (1 - i) g
    torch.addcmul(f, f, f, value=-1, out=k[:, :, 1])  # f (1 - f) c_prev
    k[1:, :, 1].mul_(cs[:-1])
    k[0, :, 1].mul_(c0)
    torch.addcmul(i, i, g * g, value=-1, out=k[:, :, 2])  # i (1 - g^2)
    torch.addcmul(o, o, o, value=-1, out=k[:, :, 3]).mul_(tcs)  # o (1 - o) tanh(c)
    return k, torch.addcmul(o, o, tcs * tcs, value=-1)  # o (1 - tanh(c)^2)


def _lstm_backward_loop(
    gates: Tensor,
    cs: Tensor,
    tcs: Tensor,
    c0: Tensor,
    w_hh_t: Tensor,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of _lstm_forward_loop, given W_hh^T (H, 4H): returns d(pre-activation gates)
    (T, B, 4H), dh0, dc0."""
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    k, k_c = _lstm_backward_factors(gates, cs, tcs, c0)
    d_gates = torch.empty_like(gates)
    d4 = d_gates.view(T, B, 4, H)
    d_t, d_ifg, d_o = d_gates.unbind(0), d4[:, :, :3].unbind(0), d4[:, :, 3].unbind(0)
    k_ifg, k_o, k_c_t = k[:, :, :3].unbind(0), k[:, :, 3].unbind(0), k_c.unbind(0)
    f_t, dy_t = gates[:, :, H : 2 * H].unbind(0), dy.unbind(0)
    dh = dh_n + dy_t[T - 1]
    dc = dc_n
    for t in range(T - 1, -1, -1):
        dc = torch.addcmul(dc, dh, k_c_t[t])
        torch.mul(dc.unsqueeze(1), k_ifg[t], out=d_ifg[t])
        torch.mul(dh, k_o[t], out=d_o[t])
        dc = dc * f_t[t]
        dh = _mm_t(d_t[t], w_hh_t)
        if t > 0:
            dh.add_(dy_t[t - 1])
    return d_gates, dh, dc


def _ln_lstm_forward_loop(
    gates: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, g_hh: Tensor, g_c: Tensor, b_c: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The layer-normed LSTM (Ba et al. 2016) in place: gates (T, B, 4H) holds
    LN(x W_ih^T) + b on entry, i f g o after. Each step adds LN(h W_hh^T; g_hh) and outputs
    h = o * tanh(LN(c; g_c, b_c)); the carried c is the un-normed one. As in _lstm_forward_loop,
    the g gate's pre-activations come doubled (gates and g_hh).

    Returns the gates, the raw h W_hh^T (T, B, 4H) with its LayerNorm mean and rstd (T, B, 1), the
    cell states C (T, B, H) with theirs, tanh(LN(C)) and the outputs Hs (T, B, H).
    """
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    hp = torch.empty_like(gates)
    cs = gates.new_empty((T, B, H))
    tcs = gates.new_empty((T, B, H))
    hs = gates.new_empty((T, B, H))
    g_t, i_t, f_t = gates.unbind(0), gates[:, :, :H].unbind(0), gates[:, :, H : 2 * H].unbind(0)
    gg_t, o_t = gates[:, :, 2 * H : 3 * H].unbind(0), gates[:, :, 3 * H :].unbind(0)
    hp_t, c_t, tc_t, h_t = hp.unbind(0), cs.unbind(0), tcs.unbind(0), hs.unbind(0)
    stats: list[list[Tensor]] = [[], [], [], []]  # mean, rstd of h W_hh^T; mean, rstd of c
    h, c = h0, c0
    for t in range(T):
        hp_t[t].copy_(_mm_t(h, w_hh))
        y, mean, rstd = torch.native_layer_norm(hp_t[t], [4 * H], g_hh, None, 1e-5)
        stats[0].append(mean)
        stats[1].append(rstd)
        # The gate math repeats _lstm_forward_loop's on purpose: a shared helper function cost
        # 7-8% of an update at H512 (a Python call per step; 5 interleaved A/B pairs).
        g_t[t].add_(y).sigmoid_()  # (B, 4H)
        gg_t[t].mul_(2).sub_(1)  # tanh
        torch.mul(f_t[t], c, out=c_t[t])
        c_t[t].addcmul_(i_t[t], gg_t[t])
        c_out, mean, rstd = torch.native_layer_norm(c_t[t], [H], g_c, b_c, 1e-5)
        stats[2].append(mean)
        stats[3].append(rstd)
        torch.tanh(c_out, out=tc_t[t])
        torch.mul(tc_t[t], o_t[t], out=h_t[t])
        h, c = h_t[t], c_t[t]
    m_hh, r_hh, m_c, r_c = [torch.stack(s) for s in stats]
    return gates, hp, m_hh, r_hh, cs, m_c, r_c, tcs, hs


def _ln_lstm_backward_loop(
    gates: Tensor,
    hp: Tensor,
    mean_hh: Tensor,
    rstd_hh: Tensor,
    cs: Tensor,
    mean_c: Tensor,
    rstd_c: Tensor,
    tcs: Tensor,
    c0: Tensor,
    w_hh_t: Tensor,
    g_hh: Tensor,
    g_c: Tensor,
    b_c: Tensor,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of _ln_lstm_forward_loop, given W_hh^T (H, 4H): d(gate inputs) and
    d(h W_hh^T), both (T, B, 4H), d(LN(c)) (T, B, H) for the c LayerNorm's affine gradients, dh0,
    dc0. Each step's two LayerNorm backwards are ATen's fused kernel, one op each instead of
    eight."""
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    k, k_co = _lstm_backward_factors(gates, cs, tcs, c0)  # d LN(c) = dh * k_co
    d_gates = torch.empty_like(gates)
    d4 = d_gates.view(T, B, 4, H)
    d_hp = torch.empty_like(gates)  # d(h W_hh^T)
    d_cout = torch.empty_like(cs)
    d_t, d_ifg, d_o = d_gates.unbind(0), d4[:, :, :3].unbind(0), d4[:, :, 3].unbind(0)
    k_ifg, k_o, k_co_t = k[:, :, :3].unbind(0), k[:, :, 3].unbind(0), k_co.unbind(0)
    f_t, dy_t = gates[:, :, H : 2 * H].unbind(0), dy.unbind(0)
    d_hp_t, d_cout_t = d_hp.unbind(0), d_cout.unbind(0)
    hp_t, c_t = hp.unbind(0), cs.unbind(0)
    m_hh, r_hh, m_c, r_c = mean_hh.unbind(0), rstd_hh.unbind(0), mean_c.unbind(0), rstd_c.unbind(0)
    dh = dh_n + dy_t[T - 1]
    dc = dc_n
    ln_backward = torch.ops.aten.native_layer_norm_backward
    only_input = [True, False, False]  # the affine gradients are summed after the loop
    for t in range(T - 1, -1, -1):
        torch.mul(dh, k_co_t[t], out=d_cout_t[t])
        dc = dc + ln_backward(d_cout_t[t], c_t[t], [H], m_c[t], r_c[t], g_c, b_c, only_input)[0]
        torch.mul(dc.unsqueeze(1), k_ifg[t], out=d_ifg[t])
        torch.mul(dh, k_o[t], out=d_o[t])
        dc = dc * f_t[t]
        d_hp_t[t].copy_(
            ln_backward(d_t[t], hp_t[t], [4 * H], m_hh[t], r_hh[t], g_hh, None, only_input)[0]
        )
        dh = _mm_t(d_hp_t[t], w_hh_t)
        if t > 0:
            dh.add_(dy_t[t - 1])
    return d_gates, d_hp, d_cout, dh, dc


def _gru_forward_loop(
    gates: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the recurrence in place: gates (T, B, 3H) holds x W_ih^T + b_ih on entry, r z n after.

    Returns the gates, W_hn h + b_hn (needed by backward) and the outputs Hs, both (T, B, H).
    """
    T, B = gates.shape[0], gates.shape[1]
    H = h0.shape[1]
    hn = gates.new_empty((T, B, H))
    hs = gates.new_empty((T, B, H))
    h = h0
    for t in range(T):
        g = gates[t]  # (B, 3H)
        hp = _mm_t(h, w_hh).add_(b_hh)  # (B, 3H)
        rz = g[:, : 2 * H]
        rz.add_(hp[:, : 2 * H]).sigmoid_()
        hn[t].copy_(hp[:, 2 * H :])
        n = g[:, 2 * H :]
        n.addcmul_(rz[:, :H], hn[t]).tanh_()
        h_t = hs[t]
        torch.sub(h, n, out=h_t)
        h_t.mul_(rz[:, H:]).add_(n)  # h' = n + z (h - n)
        h = h_t
    return gates, hn, hs


def _gru_backward_loop(
    gates: Tensor, hn: Tensor, h_prev: Tensor, w_hh_t: Tensor, dy: Tensor, dh_n: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of _gru_forward_loop, given W_hh^T (H, 3H): d(x-side pre-activations), d(h-side
    ones), both (T, B, 3H)."""
    T, B = gates.shape[0], gates.shape[1]
    H = hn.shape[2]
    r, z, n = gates.chunk(3, 2)  # each (T, B, H)
    k_n = (1 - z) * (1 - n * n)  # d a_n = dh * k_n
    k_r = k_n * hn * r * (1 - r)
    k_z = (h_prev - n) * z * (1 - z)
    k_x = torch.stack([k_r, k_z, k_n], 2)  # (T, B, 3, H)
    k_h = torch.stack([k_r, k_z, k_n * r], 2)  # r gates the h-side n pre-activation
    d_x = torch.empty_like(gates)
    d_h = torch.empty_like(gates)
    dx4, dh4 = d_x.view(T, B, 3, H), d_h.view(T, B, 3, H)
    dh = dh_n + dy[T - 1]
    for t in range(T - 1, -1, -1):
        dh1 = dh.unsqueeze(1)
        torch.mul(dh1, k_x[t], out=dx4[t])
        torch.mul(dh1, k_h[t], out=dh4[t])
        direct = dh * z[t] if t == 0 else torch.addcmul(dy[t - 1], dh, z[t])
        dh = _mm_t(d_h[t], w_hh_t).add_(direct)
    return d_x, d_h, dh


def _lstm_step_into(g: Tensor, c: Tensor, c_out: Tensor, tc_out: Tensor, h_out: Tensor) -> None:
    """One step's LSTM gate math (the compile backend fuses it), written where
    _lstm_forward_loop writes it: g (B, 4H) holds the pre-activations, g block doubled, and
    gets i f g o; c_out, tc_out and h_out (B, H) get c, tanh(c) and h. Writing into the
    window's buffers spares stacking every step's outputs after the loop."""
    i, f, gg, o = g.sigmoid().chunk(4, 1)
    gg = 2 * gg - 1
    c_new = f * c + i * gg
    tc = torch.tanh(c_new)
    g.copy_(torch.cat([i, f, gg, o], 1))
    c_out.copy_(c_new)
    tc_out.copy_(tc)
    h_out.copy_(o * tc)


def _gru_step_into(g: Tensor, hp: Tensor, h: Tensor, hn_out: Tensor, h_out: Tensor) -> None:
    """One step's GRU gate math (the compile backend fuses it), written where _gru_forward_loop
    writes it: g (B, 3H) holds x W_ih^T + b_ih and gets r z n; hp (B, 3H) is h W_hh^T + b_hh;
    hn_out and h_out (B, H) get W_hn h + b_hn and the new h."""
    x_r, x_z, x_n = g.chunk(3, 1)
    h_r, h_z, h_n = hp.chunk(3, 1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    g.copy_(torch.cat([r, z, n], 1))
    hn_out.copy_(h_n)
    h_out.copy_(n + z * (h - n))


def _lstm_forward_stepwise(
    step: Callable[..., None], gates: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """_lstm_forward_loop with the gate math in a separate (compiled) step function."""
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    cs, tcs, hs = (gates.new_empty((T, B, H)) for _ in range(3))
    g_t, c_t, tc_t, h_t = gates.unbind(0), cs.unbind(0), tcs.unbind(0), hs.unbind(0)
    h, c = h0, c0
    for t in range(T):
        g_t[t].add_(_mm_t(h, w_hh))
        step(g_t[t], c, c_t[t], tc_t[t], h_t[t])
        h, c = h_t[t], c_t[t]
    return gates, cs, tcs, hs


def _gru_forward_stepwise(
    step: Callable[..., None], gates: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """_gru_forward_loop with the gate math in a separate (compiled) step function."""
    T, B = gates.shape[0], gates.shape[1]
    H = h0.shape[1]
    hn, hs = gates.new_empty((T, B, H)), gates.new_empty((T, B, H))
    g_t, hn_t, h_t = gates.unbind(0), hn.unbind(0), hs.unbind(0)
    h = h0
    for t in range(T):
        step(g_t[t], _mm_t(h, w_hh).add_(b_hh), h, hn_t[t], h_t[t])
        h = h_t[t]
    return gates, hn, hs


class _FirstCallTimer:
    """Log how long the first call took: for a compiled function that is the compile time."""

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what, self.done = fn, what, False

    def __call__(self, *args: Any) -> Any:
        if self.done:
            return self.fn(*args)
        start = time.perf_counter()
        out = self.fn(*args)
        self.done = True
        log.info("torch.compile: %s ready in %.1f s", self.what, time.perf_counter() - start)
        return out


class _Loops:
    """The time loops and steps one backend runs: eager, TorchScript, or torch.compile steps.

    jit scripts the whole fused loops; compile compiles only the per-step gate math (and the
    autograd cells), so compilation stays a few seconds instead of unrolling T steps.
    """

    def __init__(self, kind: str) -> None:
        self.lstm_forward, self.gru_forward = _lstm_forward_loop, _gru_forward_loop
        self.lstm_backward, self.gru_backward = _lstm_backward_loop, _gru_backward_loop
        self.ln_lstm_forward, self.ln_lstm_backward = _ln_lstm_forward_loop, _ln_lstm_backward_loop
        self.lstm_cell, self.gru_cell = lstm_cell, gru_cell
        if kind == "jit":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns per scripted function; we warn once
                self.lstm_forward = torch.jit.script(_lstm_forward_loop)
                self.gru_forward = torch.jit.script(_gru_forward_loop)
                self.lstm_backward = torch.jit.script(_lstm_backward_loop)
                self.gru_backward = torch.jit.script(_gru_backward_loop)
            warnings.warn(
                "backend 'jit' uses torch.jit.script, which PyTorch deprecates; "
                "prefer backend 'compile' on new setups",
                FutureWarning,
                stacklevel=5,
            )
        elif kind == "compile":

            def compiled(fn: Callable[..., Any], what: str) -> _FirstCallTimer:
                return _FirstCallTimer(torch.compile(fn, dynamic=False, fullgraph=True), what)

            lstm_step = compiled(_lstm_step_into, "LSTM step")
            gru_step = compiled(_gru_step_into, "GRU step")
            self.lstm_forward = functools.partial(_lstm_forward_stepwise, lstm_step)
            self.gru_forward = functools.partial(_gru_forward_stepwise, gru_step)
            self.lstm_cell = compiled(lstm_cell, "LSTM cell with options")
            self.gru_cell = compiled(gru_cell, "GRU cell with options")


_LOOPS: dict[str, _Loops] = {}


def _loops(kind: str) -> _Loops:
    """Build each kind once per process: scripting is slow and warns, compiled steps are cached."""
    if kind not in _LOOPS:
        _LOOPS[kind] = _Loops(kind)
    return _LOOPS[kind]


class _WindowProjection(torch.autograd.Function):
    """x (T, B, I) -> x W^T (T, B, G*H) for a whole window, on the GEMM _mm_t picks (F.linear
    would take torch.mm's, half as fast on CPU here): the hoisted input projection of the
    autograd cells."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, -1)  # (T*B, I)
        ctx.save_for_backward(x2, w)
        return _mm_t(x2, w).view(T, B, -1)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor]:
        x2, w = ctx.saved_tensors
        T, B, G = dy.shape
        d2 = dy.reshape(T * B, G)
        dx = _input_grad(ctx.needs_input_grad[0], d2, w, T, B)
        (dw,), _ = _linear_grads(d2, [x2])
        return dx, dw


class _FusedLSTMLayer(torch.autograd.Function):
    """One LSTM layer over a window, time-major x (T, B, I) -> (hs (T, B, H), h_T, c_T)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor,
        b_hh: Tensor,
        loops: _Loops,
    ) -> tuple[Tensor, Tensor, Tensor]:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, -1)  # (T*B, I)
        gates = _mm_t(x2, _double_g(w_ih)).add_(_double_g(b_ih + b_hh)).view(T, B, -1)
        gates, cs, tcs, hs = loops.lstm_forward(gates, h0, c0, _pack(_double_g(w_hh), B))
        ctx.save_for_backward(x2, h0, c0, w_ih, w_hh, gates, cs, tcs, hs)
        ctx.loops = loops
        return hs, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dh_n: Tensor, dc_n: Tensor) -> tuple[Tensor | None, ...]:
        x2, h0, c0, w_ih, w_hh, gates, cs, tcs, hs = ctx.saved_tensors
        T, B, G = gates.shape
        w_hh_t = _pack(w_hh.t().contiguous(), B)  # (H, 4H)
        d_gates, dh0, dc0 = ctx.loops.lstm_backward(gates, cs, tcs, c0, w_hh_t, dy, dh_n, dc_n)
        d2 = d_gates.view(T * B, G)  # (T*B, 4H)
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).view(T * B, -1)  # (T*B, H)
        dx = _input_grad(ctx.needs_input_grad[0], d2, w_ih, T, B)
        (dw_ih, dw_hh), db = _linear_grads(d2, [x2, h_prev])
        return dx, dh0, dc0, dw_ih, dw_hh, db, db, None


class _LNSaved(NamedTuple):
    """What the layer-normed layer's backward reads: inputs, then what the forward made."""

    x2: Tensor  # (T*B, I)
    xw: Tensor  # (T*B, 4H) x W_ih^T before its LayerNorm, with its mean and rstd (T*B, 1)
    m_ih: Tensor
    r_ih: Tensor
    h0: Tensor
    c0: Tensor
    w_ih: Tensor
    w_hh: Tensor
    b: Tensor  # b_ih + b_hh, the input LayerNorm's beta
    g_ih: Tensor
    g_hh: Tensor
    g_c: Tensor
    b_c: Tensor
    gates: Tensor  # (T, B, 4H) activated
    hp: Tensor  # (T, B, 4H) h W_hh^T before its LayerNorm, with its mean and rstd (T, B, 1)
    m_hh: Tensor
    r_hh: Tensor
    cs: Tensor  # (T, B, H) cell states before their LayerNorm, with its mean and rstd
    m_c: Tensor
    r_c: Tensor
    tcs: Tensor  # (T, B, H) tanh(LN(c))
    hs: Tensor  # (T, B, H)


class _FusedLNLSTMLayer(torch.autograd.Function):
    """One layer-normed LSTM layer over a window, time-major x (T, B, I) -> (hs (T, B, H), h_T,
    c_T). The input projection's LayerNorm is inside too: its beta slot carries b_ih + b_hh."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor,
        b_hh: Tensor,
        g_ih: Tensor,
        g_hh: Tensor,
        g_c: Tensor,
        b_c: Tensor,
        loops: _Loops,
    ) -> tuple[Tensor, Tensor, Tensor]:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, -1)  # (T*B, I)
        xw = _mm_t(x2, w_ih)  # (T*B, 4H)
        b = b_ih + b_hh
        gates, m_ih, r_ih = torch.native_layer_norm(
            xw, [xw.shape[1]], _double_g(g_ih), _double_g(b), 1e-5
        )
        gates, hp, m_hh, r_hh, cs, m_c, r_c, tcs, hs = loops.ln_lstm_forward(
            gates.view(T, B, -1), h0, c0, _pack(w_hh, B), _double_g(g_hh), g_c, b_c
        )
        ctx.save_for_backward(
            *_LNSaved(
                x2, xw, m_ih, r_ih, h0, c0, w_ih, w_hh, b, g_ih, g_hh, g_c, b_c,
                gates, hp, m_hh, r_hh, cs, m_c, r_c, tcs, hs,
            )
        )  # fmt: skip
        ctx.loops = loops
        return hs, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dh_n: Tensor, dc_n: Tensor) -> tuple[Tensor | None, ...]:
        s = _LNSaved(*ctx.saved_tensors)
        T, B, G = s.gates.shape
        H = s.cs.shape[2]
        d_gates, d_hp, d_cout, dh0, dc0 = ctx.loops.ln_lstm_backward(
            s.gates, s.hp, s.m_hh, s.r_hh, s.cs, s.m_c, s.r_c, s.tcs, s.c0,
            _pack(s.w_hh.t().contiguous(), B), s.g_hh, s.g_c, s.b_c, dy, dh_n, dc_n,
        )  # fmt: skip
        ln_backward = torch.ops.aten.native_layer_norm_backward
        d2 = d_gates.view(T * B, G)
        d_xw, dg_ih, db = ln_backward(d2, s.xw, [G], s.m_ih, s.r_ih, s.g_ih, s.b, [True] * 3)
        # The step LayerNorms' affine gradients, for all steps in one fused pass each.
        hp, m_hh, r_hh = s.hp.view(T * B, G), s.m_hh.view(-1, 1), s.r_hh.view(-1, 1)
        dg_hh = ln_backward(d2, hp, [G], m_hh, r_hh, s.g_hh, None, [False, True, False])[1]
        d_c, cs, m_c, r_c = d_cout.view(T * B, H), s.cs.view(T * B, H), s.m_c, s.r_c
        _, dg_c, db_c = ln_backward(d_c, cs, [H], m_c, r_c, s.g_c, s.b_c, [False, True, True])
        h_prev = torch.cat([s.h0.unsqueeze(0), s.hs[:-1]]).view(T * B, -1)  # (T*B, H)
        dx = _input_grad(ctx.needs_input_grad[0], d_xw, s.w_ih, T, B)
        (dw_ih,), _ = _linear_grads(d_xw, [s.x2])
        (dw_hh,), _ = _linear_grads(d_hp.view(T * B, G), [h_prev])
        return dx, dh0, dc0, dw_ih, dw_hh, db, db, dg_ih, dg_hh, dg_c, db_c, None


class _FusedGRULayer(torch.autograd.Function):
    """One GRU layer over a window, time-major x (T, B, I) -> (hs (T, B, H), h_T)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        h0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor,
        b_hh: Tensor,
        loops: _Loops,
    ) -> tuple[Tensor, Tensor]:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, -1)  # (T*B, I)
        gates = _mm_t(x2, w_ih).add_(b_ih).view(T, B, -1)  # (T, B, 3H)
        gates, hn, hs = loops.gru_forward(gates, h0, _pack(w_hh, B), b_hh)
        ctx.save_for_backward(x2, h0, w_ih, w_hh, gates, hn, hs)
        ctx.loops = loops
        return hs, hs[-1].clone()

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dh_n: Tensor) -> tuple[Tensor | None, ...]:
        x2, h0, w_ih, w_hh, gates, hn, hs = ctx.saved_tensors
        T, B, G = gates.shape
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])  # (T, B, H)
        w_hh_t = _pack(w_hh.t().contiguous(), B)  # (H, 3H)
        d_x, d_h, dh0 = ctx.loops.gru_backward(gates, hn, h_prev, w_hh_t, dy, dh_n)
        dx2, dh2 = d_x.view(T * B, G), d_h.view(T * B, G)  # (T*B, 3H)
        dx = _input_grad(ctx.needs_input_grad[0], dx2, w_ih, T, B)
        h2 = h_prev.view(T * B, -1)
        (dw_ih,), db_ih = _linear_grads(dx2, [x2])
        (dw_hh,), db_hh = _linear_grads(dh2, [h2])
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None


# ---------------------------------------------------------------------------------------------
# Cell -> layer -> stack through autograd: the reference, and home of every option.
# ---------------------------------------------------------------------------------------------


class LayerWeights(NamedTuple):
    """What one layer's step needs besides its input; None where an option is off."""

    w_hh: Tensor  # (G*H, H_out), weight-dropped in training when weight_drop > 0
    b_hh: Tensor | None  # (G*H,) GRU only: LSTM folds it into the hoisted input projection
    w_hr: Tensor | None  # (H_out, H) LSTM projection
    ln_hh: Tensor | None  # (G*H,) gain of the layer norm on h W_hh^T
    ln_c_w: Tensor | None  # (H,) gain and bias of the layer norm on c
    ln_c_b: Tensor | None
    w_ci: Tensor | None  # (H,) peephole weights (diagonal)
    w_cf: Tensor | None
    w_co: Tensor | None


class StepOptions(NamedTuple):
    """Per-window constants of the step: masks and probabilities."""

    training: bool
    zoneout: float
    recurrent_dropout: float
    recurrent_mask: Tensor | None  # (B, H_out) variational mask, scaled; None: fresh per step
    cell_clip: float | None


def _recurrent_input(h: Tensor, opt: StepOptions) -> Tensor:
    """h as seen by W_hh: dropped on the hidden-to-hidden path in training."""
    if opt.recurrent_mask is not None:
        return h * opt.recurrent_mask
    if opt.training and opt.recurrent_dropout > 0:
        return F.dropout(h, opt.recurrent_dropout, training=True)
    return h


def _zoneout(prev: Tensor, new: Tensor, opt: StepOptions) -> Tensor:
    """Keep each unit's previous value with probability p in training; the expectation at eval."""
    if opt.zoneout <= 0:
        return new
    if opt.training:
        keep = torch.rand_like(new, dtype=torch.float32) < opt.zoneout
        return torch.where(keep, prev, new)
    return torch.lerp(new, prev.to(new.dtype), opt.zoneout)


def lstm_cell(
    xp: Tensor, state: tuple[Tensor, Tensor], w: LayerWeights, opt: StepOptions
) -> tuple[Tensor, Tensor]:
    """One LSTM step; xp (B, 4H) is the precomputed x W_ih^T + b_ih + b_hh (layer-normed if on)."""
    h, c = state  # (B, H_out), (B, H)
    hp = _recurrent_input(h, opt).matmul(w.w_hh.t())  # (B, 4H)
    if w.ln_hh is not None:
        hp = F.layer_norm(hp, hp.shape[-1:], w.ln_hh)
    i, f, g, o = (xp + hp).chunk(4, 1)
    if w.w_ci is not None:
        i, f = i + c * w.w_ci, f + c * w.w_cf
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    if opt.cell_clip is not None:
        c_new = c_new.clamp(-opt.cell_clip, opt.cell_clip)
    if w.w_co is not None:
        o = o + c_new * w.w_co
    c_out = c_new if w.ln_c_w is None else F.layer_norm(c_new, c_new.shape[-1:], w.ln_c_w, w.ln_c_b)
    h_new = torch.sigmoid(o) * torch.tanh(c_out)
    if w.w_hr is not None:
        h_new = h_new.matmul(w.w_hr.t())  # (B, H_out)
    return _zoneout(h, h_new, opt), _zoneout(c, c_new, opt)


def gru_cell(xp: Tensor, state: tuple[Tensor], w: LayerWeights, opt: StepOptions) -> tuple[Tensor]:
    """One GRU step; xp (B, 3H) is the precomputed x W_ih^T + b_ih (layer-normed if on)."""
    (h,) = state  # (B, H)
    hp = _recurrent_input(h, opt).matmul(w.w_hh.t())  # (B, 3H)
    if w.ln_hh is not None:
        hp = F.layer_norm(hp, hp.shape[-1:], w.ln_hh)
    hp = hp + w.b_hh
    x_r, x_z, x_n = xp.chunk(3, 1)
    h_r, h_z, h_n = hp.chunk(3, 1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (_zoneout(h, n + z * (h - n), opt),)


def run_layer(
    cell_fn: Callable[..., State], xp: Tensor, state: State, w: LayerWeights, opt: StepOptions
) -> tuple[Tensor, State]:
    """The loop over time: xp (T, B, G*H) -> outputs (T, B, H_out) and the final state.

    ``unbind`` hands each step a separate view; indexing ``xp[t]`` instead would make backward
    accumulate into a full (T, B, G*H) gradient at every step (quadratic in T).
    """
    ys = []
    for xp_t in xp.unbind(0):
        state = cell_fn(xp_t, state, w, opt)
        ys.append(state[0])
    return torch.stack(ys), state


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class RecurrentStack(nn.Module):
    """Cell -> layer -> stack over nn.LSTM / nn.GRU's parameter layout (modular, jit, compile).

    Layers run time-major internally so every per-step slice is contiguous. A layer whose options
    need no per-step autograd (weight_drop and between-layer dropout act outside the loop) runs
    the fused loop with its hand-written backward; any other runs the autograd cell.
    """

    def __init__(
        self,
        backend: str,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        opts: dict[str, object],
    ) -> None:
        super().__init__()
        self.backend, self.cell = backend, cell
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.proj_size = int(opts["proj_size"])
        self.dropout = float(opts["dropout"])
        self.layernorm = bool(opts["layernorm"])
        self.recurrent_dropout = float(opts["recurrent_dropout"])
        self.variational = bool(opts["variational"])
        self.weight_drop = float(opts["weight_drop"])
        self.zoneout = float(opts["zoneout"])
        self.cell_clip = None if opts["cell_clip"] is None else float(opts["cell_clip"])
        self.peephole = bool(opts["peephole"])
        per_step = bool(
            self.recurrent_dropout
            or self.zoneout
            or self.cell_clip is not None
            or self.peephole
            or self.proj_size
        )
        self.fused = not (per_step or self.layernorm)
        self.fused_layernorm = cell == "lstm" and self.layernorm and not per_step
        self.state_size = 2 if cell == "lstm" else 1
        gh = (4 if cell == "lstm" else 3) * hidden_size
        h_out = self.proj_size or hidden_size
        # Same registration order as nn.LSTM, so state_dict keys come out in the same order.
        for k in range(num_layers):
            in_k = input_size if k == 0 else h_out
            self._param(f"weight_ih_l{k}", gh, in_k)
            self._param(f"weight_hh_l{k}", gh, h_out)
            self._param(f"bias_ih_l{k}", gh)
            self._param(f"bias_hh_l{k}", gh)
            if self.proj_size:
                self._param(f"weight_hr_l{k}", h_out, hidden_size)
        for k in range(num_layers):
            if self.layernorm:
                self._param(f"layernorm_ih_weight_l{k}", gh)
                self._param(f"layernorm_hh_weight_l{k}", gh)
                if cell == "lstm":
                    self._param(f"layernorm_c_weight_l{k}", hidden_size)
                    self._param(f"layernorm_c_bias_l{k}", hidden_size)
            if self.peephole:
                for gate in "ifo":
                    self._param(f"weight_c{gate}_l{k}", hidden_size)
        self.reset_parameters(float(opts["forget_bias"]))
        self._loops = _loops(backend)

    def _param(self, name: str, *shape: int) -> None:
        self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def reset_parameters(self, forget_bias: float = 0.0) -> None:
        """nn.LSTM's init (uniform +-1/sqrt(H)); layer-norm gains 1 and biases 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("layernorm_"):
                    p.fill_(0.0 if "_bias_" in name else 1.0)
                else:
                    p.uniform_(-bound, bound)
        _add_forget_bias(self, self.num_layers, self.hidden_size, forget_bias)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        B = x.shape[0]
        L, H = self.num_layers, self.hidden_size
        shapes = [(L, B, self.proj_size or H), (L, B, H)][: self.state_size]
        _check_state(x, state, self.state_size, shapes)
        if state is None:
            state = tuple(x.new_zeros(s, dtype=_compute_dtype(x)) for s in shapes)
        seq = x.transpose(0, 1)  # (T, B, I) time-major
        finals: list[State] = []
        for k in range(L):
            if k > 0:
                seq = self._between_layers(seq)
            seq, final = self._layer(k, seq, tuple(s[k] for s in state))
            finals.append(final)
        new_state = tuple(torch.stack(parts) for parts in zip(*finals, strict=True))
        return seq.transpose(0, 1), new_state  # (B, T, H_out)

    def _between_layers(self, seq: Tensor) -> Tensor:
        """Dropout on a lower layer's output; one mask per window when variational."""
        if not (self.training and self.dropout > 0):
            return seq
        if not self.variational:
            return F.dropout(seq, self.dropout, training=True)
        keep = 1.0 - self.dropout
        mask = seq.new_empty(seq.shape[1:]).bernoulli_(keep).div_(keep)  # (B, H_out)
        return seq * mask

    def _layer(self, k: int, seq: Tensor, state: State) -> tuple[Tensor, State]:
        w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
        b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
        if self.training and self.weight_drop > 0:
            w_hh = F.dropout(w_hh, self.weight_drop, training=True)  # one mask per window
        if self.fused:
            return self._fused_layer(seq, state, w_ih, w_hh, b_ih, b_hh)
        if self.fused_layernorm:
            norms = ("ih_weight", "hh_weight", "c_weight", "c_bias")
            norm_params = [getattr(self, f"layernorm_{n}_l{k}") for n in norms]
            return self._apply_fused(
                _FusedLNLSTMLayer, [seq, *state, w_ih, w_hh, b_ih, b_hh, *norm_params]
            )
        dtype = _compute_dtype(seq)  # autocast does not reach inside a custom Function
        xp = _WindowProjection.apply(seq.to(dtype), w_ih.to(dtype))  # (T, B, G*H), hoisted
        if self.layernorm:
            xp = F.layer_norm(xp, xp.shape[-1:], getattr(self, f"layernorm_ih_weight_l{k}"))
        xp = xp + (b_ih + b_hh if self.cell == "lstm" else b_ih)
        w = LayerWeights(
            w_hh=w_hh,
            b_hh=b_hh if self.cell == "gru" else None,
            w_hr=getattr(self, f"weight_hr_l{k}", None),
            ln_hh=getattr(self, f"layernorm_hh_weight_l{k}", None),
            ln_c_w=getattr(self, f"layernorm_c_weight_l{k}", None),
            ln_c_b=getattr(self, f"layernorm_c_bias_l{k}", None),
            w_ci=getattr(self, f"weight_ci_l{k}", None),
            w_cf=getattr(self, f"weight_cf_l{k}", None),
            w_co=getattr(self, f"weight_co_l{k}", None),
        )
        mask = None
        if self.training and self.recurrent_dropout > 0 and self.variational:
            keep = 1.0 - self.recurrent_dropout
            mask = state[0].new_empty(state[0].shape).bernoulli_(keep).div_(keep)  # (B, H_out)
        opt = StepOptions(self.training, self.zoneout, self.recurrent_dropout, mask, self.cell_clip)
        step = self._loops.lstm_cell if self.cell == "lstm" else self._loops.gru_cell
        return run_layer(step, xp, state, w, opt)

    def _fused_layer(
        self, seq: Tensor, state: State, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
    ) -> tuple[Tensor, State]:
        function = _FusedLSTMLayer if self.cell == "lstm" else _FusedGRULayer
        return self._apply_fused(function, [seq, *state, w_ih, w_hh, b_ih, b_hh])

    def _apply_fused(
        self, function: type[torch.autograd.Function], tensors: list[Tensor]
    ) -> tuple[Tensor, State]:
        """Run a hand-differentiated loop in one dtype (autocast does not reach inside it)."""
        dtype = _compute_dtype(tensors[0])
        with torch.autocast(tensors[0].device.type, enabled=False):
            hs, *state = function.apply(*[t.to(dtype) for t in tensors], self._loops)
        return hs, tuple(state)


def build_recurrent(
    backend: str, cell: str, input_size: int, hidden_size: int, num_layers: int, **options: object
) -> nn.Module:
    """Build a batch-first recurrent stack; see the module docstring for the contract."""
    check_options(backend, cell, num_layers, **options)
    opts = _options(options)
    if backend == "cudnn":
        return _build_cudnn(cell, input_size, hidden_size, num_layers, opts)
    return RecurrentStack(backend, cell, input_size, hidden_size, num_layers, opts)


def kernel_name(module: nn.Module, device: torch.device) -> str:
    """What actually runs, for the startup log (the backend name alone does not say it)."""
    device = torch.device(device)
    if isinstance(module, CudnnRecurrent):
        if device.type == "cuda":
            return "cuDNN" if torch.backends.cudnn.is_available() else "native fused"
        return "oneDNN/native fused"
    if isinstance(module, RecurrentStack):
        loop = {"jit": "TorchScript", "compile": "torch.compile (inductor)"}.get(
            module.backend, "python"
        )
        if device.type == "cuda":
            return f"{loop} loop, cuBLAS GEMM"
        return f"{loop} loop, {'oneDNN' if _onednn_enabled() else 'BLAS'} GEMM"
    return "python"
