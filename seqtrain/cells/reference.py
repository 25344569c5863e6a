"""The reference cells: one LSTM / GRU step through autograd, the loop over time, the per-step
options. They are the specification every fast path is tested against, and they run whenever an
option needs per-step autograd (recurrent dropout, zoneout, peephole, cell clip, projection)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells.base import Shapes, State, check_input, compute_dtype


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


# A step: (x-side pre-activations (B, G*H), state, weights, options) -> new state.
Step = Callable[[Tensor, State, LayerWeights, StepOptions], State]


def recurrent_input(h: Tensor, opt: StepOptions) -> Tensor:
    """h as seen by W_hh: dropped on the hidden-to-hidden path in training."""
    if opt.recurrent_mask is not None:
        return h * opt.recurrent_mask
    if opt.training and opt.recurrent_dropout > 0:
        return F.dropout(h, opt.recurrent_dropout, training=True)
    return h


def zoneout(prev: Tensor, new: Tensor, opt: StepOptions) -> Tensor:
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
    hp = recurrent_input(h, opt).matmul(w.w_hh.t())  # (B, 4H)
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
    return zoneout(h, h_new, opt), zoneout(c, c_new, opt)


def gru_cell(xp: Tensor, state: tuple[Tensor], w: LayerWeights, opt: StepOptions) -> tuple[Tensor]:
    """One GRU step; xp (B, 3H) is the precomputed x W_ih^T + b_ih (layer-normed if on)."""
    (h,) = state  # (B, H)
    hp = recurrent_input(h, opt).matmul(w.w_hh.t())  # (B, 3H)
    if w.ln_hh is not None:
        hp = F.layer_norm(hp, hp.shape[-1:], w.ln_hh)
    hp = hp + w.b_hh
    x_r, x_z, x_n = xp.chunk(3, 1)
    h_r, h_z, h_n = hp.chunk(3, 1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (zoneout(h, n + z * (h - n), opt),)


def run_layer(
    step: Step, xp: Tensor, state: State, w: LayerWeights, opt: StepOptions
) -> tuple[Tensor, State]:
    """The loop over time: xp (T, B, G*H) -> outputs (T, B, H_out) and the final state.

    ``unbind`` hands each step a separate view; indexing ``xp[t]`` instead would make backward
    accumulate into a full (T, B, G*H) gradient at every step (quadratic in T).
    """
    ys = []
    for xp_t in xp.unbind(0):
        state = step(xp_t, state, w, opt)
        ys.append(state[0])
    return torch.stack(ys), state


def between_layers(seq: Tensor, p: float, variational: bool, training: bool) -> Tensor:
    """Dropout on a lower layer's output seq (T, B, H); one mask per window when variational."""
    if not (training and p > 0):
        return seq
    if not variational:
        return F.dropout(seq, p, training=True)
    keep = 1.0 - p
    mask = seq.new_empty(seq.shape[1:]).bernoulli_(keep).div_(keep)  # (B, H_out)
    return seq * mask


def variational_mask(h: Tensor, p: float, variational: bool, training: bool) -> Tensor | None:
    """The window's recurrent-dropout mask (B, H_out), scaled; None when drawn fresh per step."""
    if not (training and p > 0 and variational):
        return None
    keep = 1.0 - p
    return h.new_empty(h.shape).bernoulli_(keep).div_(keep)


class LayeredStack(Shapes, nn.Module):
    """The loop over layers that every stack of per-layer time loops shares (the built-in
    cells' and a user's): a zero state when none is given, time-major inside, dropout between
    layers, one `_layer(k, seq, state)` per layer, the final states stacked per layer."""

    dropout: float
    variational: bool

    def _layer(self, k: int, seq: Tensor, state: State) -> tuple[Tensor, State]:
        """Layer k over a time-major window: seq (T, B, I) -> (T, B, H_out), its final state."""
        raise NotImplementedError

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        shapes = self.state_shapes(x.shape[0])
        check_input(x, state, shapes)
        if state is None:
            state = tuple(x.new_zeros(s, dtype=compute_dtype(x)) for s in shapes)
        seq = x.transpose(0, 1)  # (T, B, I) time-major
        finals: list[State] = []
        for k in range(self.num_layers):
            if k > 0:
                seq = between_layers(seq, self.dropout, self.variational, self.training)
            seq, final = self._layer(k, seq, tuple(s[k] for s in state))
            finals.append(final)
        new_state = tuple(torch.stack(parts) for parts in zip(*finals, strict=True))
        return seq.transpose(0, 1), new_state  # (B, T, H_out)
