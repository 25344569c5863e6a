"""Cell -> layer -> stack over nn.LSTM / nn.GRU's parameter layout: the modular, jit and compile
backends of every built-in cell, and the `CellSpec` a built-in cell registers them with.

Layers run time-major internally so every per-step slice is contiguous. A layer whose options
need no per-step autograd (weight_drop and between-layer dropout act outside the loop) runs the
cell's fused layer with its hand-written backward; any other runs the reference autograd step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells import fused
from seqtrain.cells.base import (
    VECTOR_OPTIONS,
    State,
    active,
    compute_dtype,
    register,
)
from seqtrain.cells.compiled import loops, tensor_key
from seqtrain.cells.cudnn import add_forget_bias
from seqtrain.cells.reference import (
    LayeredStack,
    LayerWeights,
    Step,
    StepOptions,
    gru_cell,
    lstm_cell,
    run_layer,
    variational_mask,
)

# Options that need a step of their own (the fused layers cannot run them).
_PER_STEP = ("recurrent_dropout", "zoneout", "cell_clip", "peephole", "proj_size")


@dataclass(frozen=True)
class CellSpec:
    """What the stack needs to know of a built-in cell; the step is its specification."""

    name: str
    gates: int  # G: weight_ih is (G*H, I), gate blocks in nn.LSTM / nn.GRU order
    num_states: int  # 2: (h, c); 1: (h,)
    step: Step  # the reference autograd step (reference.py)
    bias_in_step: bool  # b_hh reaches the step (GRU: r gates it) or joins the input projection
    fused: type[torch.autograd.Function] | None = None  # layer without per-step options
    fused_layernorm: type[torch.autograd.Function] | None = None  # the same with layernorm


def register_cell(spec: CellSpec, backends: Iterable[str], options: Iterable[str]) -> None:
    """Register `spec` for stack backends (jit needs a fused layer: it scripts those loops)."""
    for backend in backends:

        def build(
            cell: str, input_size: int, hidden: int, layers: int, opts: dict, b: str = backend
        ) -> nn.Module:
            return RecurrentStack(b, spec, input_size, hidden, layers, opts)

        register(spec.name, backend, options)(build)


class RecurrentStack(LayeredStack):
    """The modular / jit / compile stack of one built-in cell."""

    def __init__(
        self,
        backend: str,
        spec: CellSpec,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        opts: dict[str, object],
    ) -> None:
        super().__init__()
        self.backend, self.spec, self.cell = backend, spec, spec.name
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.num_states, self.gates = spec.num_states, spec.gates
        self.proj_size = int(opts["proj_size"])
        self.output_size = self.proj_size or hidden_size
        self.dropout = float(opts["dropout"])
        self.layernorm = bool(opts["layernorm"])
        self.recurrent_dropout = float(opts["recurrent_dropout"])
        self.variational = bool(opts["variational"])
        self.weight_drop = float(opts["weight_drop"])
        self.zoneout = float(opts["zoneout"])
        self.cell_clip = None if opts["cell_clip"] is None else float(opts["cell_clip"])
        self.peephole = bool(opts["peephole"])
        per_step = any(active(name, opts[name]) for name in _PER_STEP)
        self.fused = spec.fused is not None and not (per_step or self.layernorm)
        self.fused_layernorm = spec.fused_layernorm is not None and self.layernorm and not per_step
        gh = spec.gates * hidden_size
        h_out = self.output_size
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
                if spec.num_states == 2:  # the cell state is normalised before the output tanh
                    self._param(f"layernorm_c_weight_l{k}", hidden_size)
                    self._param(f"layernorm_c_bias_l{k}", hidden_size)
            if self.peephole:
                for gate in "ifo":
                    self._param(f"weight_c{gate}_l{k}", hidden_size)
        self.reset_parameters(float(opts["forget_bias"]))
        loops(backend)  # built (and jit's deprecation warned) now, not at the first forward

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
        add_forget_bias(self, self.num_layers, self.hidden_size, forget_bias)

    def _layer(self, k: int, seq: Tensor, state: State) -> tuple[Tensor, State]:
        w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
        b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
        if self.training and self.weight_drop > 0:
            w_hh = F.dropout(w_hh, self.weight_drop, training=True)  # one mask per window
        if self.fused:
            return self._apply_fused(self.spec.fused, [seq, *state, w_ih, w_hh, b_ih, b_hh])
        if self.fused_layernorm:
            norms = ("ih_weight", "hh_weight", "c_weight", "c_bias")
            norm_params = [getattr(self, f"layernorm_{n}_l{k}") for n in norms]
            return self._apply_fused(
                self.spec.fused_layernorm, [seq, *state, w_ih, w_hh, b_ih, b_hh, *norm_params]
            )
        dtype = compute_dtype(seq)  # autocast does not reach inside a custom Function
        xp = fused.WindowProjection.apply(seq.to(dtype), w_ih.to(dtype))  # (T, B, G*H), hoisted
        if self.layernorm:
            xp = F.layer_norm(xp, xp.shape[-1:], getattr(self, f"layernorm_ih_weight_l{k}"))
        xp = xp + (b_ih if self.spec.bias_in_step else b_ih + b_hh)
        w = LayerWeights(
            w_hh=w_hh,
            b_hh=b_hh if self.spec.bias_in_step else None,
            w_hr=getattr(self, f"weight_hr_l{k}", None),
            ln_hh=getattr(self, f"layernorm_hh_weight_l{k}", None),
            ln_c_w=getattr(self, f"layernorm_c_weight_l{k}", None),
            ln_c_b=getattr(self, f"layernorm_c_bias_l{k}", None),
            w_ci=getattr(self, f"weight_ci_l{k}", None),
            w_cf=getattr(self, f"weight_cf_l{k}", None),
            w_co=getattr(self, f"weight_co_l{k}", None),
        )
        mask = variational_mask(state[0], self.recurrent_dropout, self.variational, self.training)
        opt = StepOptions(self.training, self.zoneout, self.recurrent_dropout, mask, self.cell_clip)
        modes = (self.training, self.zoneout, self.recurrent_dropout, mask is None, self.cell_clip)
        key = (tensor_key(xp, *state, w_hh), tuple(t is None for t in w), modes)
        step = loops(self.backend).step(self.spec.step, key)
        return run_layer(step, xp, state, w, opt)

    def _apply_fused(
        self, function: type[torch.autograd.Function], tensors: list[Tensor]
    ) -> tuple[Tensor, State]:
        """Run a hand-differentiated loop in one dtype (autocast does not reach inside it)."""
        dtype = compute_dtype(tensors[0])
        with torch.autocast(tensors[0].device.type, enabled=False):
            hs, *state = function.apply(*[t.to(dtype) for t in tensors], loops(self.backend))
        return hs, tuple(state)


LSTM = CellSpec("lstm", 4, 2, lstm_cell, False, fused.FusedLSTMLayer, fused.FusedLNLSTMLayer)
GRU = CellSpec("gru", 3, 1, gru_cell, True, fused.FusedGRULayer)
# jit scripts the fused loops, so it runs only the options that act outside the time loop.
register_cell(LSTM, ["jit"], ["dropout", "variational", "weight_drop", "forget_bias"])
register_cell(LSTM, ["modular", "compile"], VECTOR_OPTIONS)
register_cell(GRU, ["jit"], ["dropout", "variational", "weight_drop"])
# forget_bias, cell_clip, peephole and proj_size act on a cell state, which a GRU has not.
_CELL_STATE_OPTIONS = {"forget_bias", "cell_clip", "peephole", "proj_size"}
register_cell(GRU, ["modular", "compile"], VECTOR_OPTIONS - _CELL_STATE_OPTIONS)
