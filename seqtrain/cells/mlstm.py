"""xLSTM's mLSTM (Beck et al. 2024): a matrix memory with exponential input gates, stabilised in
log space, registered as ``model.cell=mlstm`` (backends ``modular`` and ``compile``).

Per head (head size d), from the layer input x_t, with i~ and f~ the gate pre-activations:

    q_t = W_q x / sqrt(d),  k_t = W_k x,  v_t = W_v x
    log f_t = logsigmoid(f~_t)   (the sigmoid forget gate, in log space)
    m_t = max(log f_t + m_{t-1}, i~_t)                        (the stabiliser)
    i'_t = exp(i~_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T,  n_t = f'_t n_{t-1} + i'_t k_t
    h~_t = C_t^T q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)
    y_t = W_out (sigmoid(W_o x_t + b_o) * RMSNorm(h~_t))    (output gate, per-head RMSNorm)

(C, n) are the paper's state scaled by exp(-m), so nothing overflows; mlstm-kernels' native
recurrent step has the same form, with m = 0 in a fresh state.

The chunk form unrolls the max: with b_t = sum_{s <= t} log f_s inside a chunk entering with
(C0, n0, m0), the log weight of the carried state at step t is a_t = b_t + m0, that of step s's
write D_ts = b_t - b_s + i~_s (s <= t), and m_t = max(a_t, max_s D_ts) exactly as the recursion
gives it; then h~_t = (e^{a_t - m_t} C0^T q_t + sum_s e^{D_ts - m_t} (q_t . k_s) v_s) over the
same sums with n0 and 1. After a reset at r the fresh state (0, 0, m = 0) enters instead:
a_t = b_t - b_{r-1} for t >= r, and no term crosses r.

State: ``(C, n, m)``, ``C (num_layers, B, heads, d, d)``, ``n (num_layers, B, heads, d)``,
``m (num_layers, B, heads)``; zero = a fresh stream.

Parameters per layer: ``proj`` (I -> 3H, rows q, k, v; no bias), ``gates`` (I -> 2 heads, rows
i, f), ``gate_out`` (I -> H, the output gate), ``norm.weight`` (d), ``proj_out`` (H -> H, no
bias). Init: nn.Linear's; the forget gate's bias linspace(3, 6) over heads (xLSTM's: memories of
20 to 400 steps), the input gate's bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells.base import State, register
from seqtrain.cells.matrix import (
    DEFAULT_HEADS,
    MatrixLayer,
    at_least_float32,
    in_chunks,
    pairwise_sums,
    segments,
    stack_builder,
)

EPS = 1e-6  # added to the normaliser's denominator (mlstm-kernels' default)


class MLSTM(MatrixLayer):
    """One mLSTM layer (module docstring)."""

    def __init__(
        self, input_size: int, hidden_size: int, num_heads: int, backend: str = "modular"
    ) -> None:
        super().__init__(input_size, hidden_size, num_heads, backend)
        H, N = hidden_size, num_heads
        self.proj = nn.Linear(input_size, 3 * H, bias=False)
        self.gates = nn.Linear(input_size, 2 * N)
        self.gate_out = nn.Linear(input_size, H)
        self.norm = nn.RMSNorm(self.head_size, eps=1e-5)
        self.proj_out = nn.Linear(H, H, bias=False)
        with torch.no_grad():
            self.gates.bias[:N].zero_()
            self.gates.bias[N:].copy_(torch.linspace(3.0, 6.0, N))

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], ...]:
        N, d = self.num_heads, self.head_size
        return (batch, N, d, d), (batch, N, d), (batch, N)

    def saved_per_step(self, batch: int, chunk: int) -> int:
        """Floating elements autograd keeps per step in the chunk form, fitted to saved-tensor
        hooks (tests/test_matrix_cells.py keeps it within 30%): about 17 H for the projections,
        gates and output, and per head (c, c) matrices (4.5 c) and the entering state (d^2 / c)
        of each chunk."""
        H, N, d = self.hidden_size, self.num_heads, self.head_size
        return batch * (17 * H + 9 * N * chunk // 2 + N * d * d // chunk)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (..., N, d) and i~, log f (..., N)."""
        q, k, v = at_least_float32(self.proj(x)).unflatten(-1, (3, self.num_heads, -1)).unbind(-3)
        i, f = at_least_float32(self.gates(x)).chunk(2, -1)
        return q * self.head_size**-0.5, k, v, i, F.logsigmoid(f)

    def _output(self, h: Tensor, x: Tensor) -> Tensor:
        """h (..., N, d) read from the state, x the layer input -> (..., H)."""
        gate = torch.sigmoid(self.gate_out(x)).unflatten(-1, (self.num_heads, self.head_size))
        return self.proj_out((self.norm(h) * gate).flatten(-2))

    def step(self, x_t: Tensor, state: State, reset: Tensor | None) -> tuple[Tensor, State]:
        C, n, m = state  # (B, N, d, d), (B, N, d), (B, N)
        if reset is not None:
            keep = ~reset
            C, n, m = C * keep[:, None, None, None], n * keep[:, None, None], m * keep[:, None]
        q, k, v, i, log_f = self._inputs(x_t)  # (B, N, d) thrice, (B, N) twice
        h, state = mlstm_step(q, k, v, i, log_f, (C.to(q.dtype), n.to(q.dtype), m.to(q.dtype)))
        return self._output(h, x_t), state

    def window(
        self, x: Tensor, state: State, resets: Tensor | None, chunk: int
    ) -> tuple[Tensor, State]:
        q, k, v, i, log_f = (t.transpose(1, 2) for t in self._inputs(x))  # (B, N, T[, d])
        with torch.autocast(x.device.type, enabled=False):  # the recurrence in float32 or more
            state = tuple(s.to(q.dtype) for s in state)
            compiled = self.backend == "compile"
            h, state = mlstm_chunkwise(q, k, v, i, log_f, state, resets, chunk, compiled)
        return self._output(h.transpose(1, 2), x), state


def mlstm_step(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, log_f: Tensor, state: State
) -> tuple[Tensor, State]:
    """One stabilised mLSTM step: q (scaled), k, v (B, N, d), i~, log f (B, N), state (C (B, N,
    d, d), n (B, N, d), m (B, N)) -> h~ (B, N, d) and the new state (module docstring)."""
    C, n, m = state
    m_new = torch.maximum(log_f + m, i)
    f, i = (log_f + m - m_new).exp(), (i - m_new).exp()
    C = f[..., None, None] * C + i[..., None, None] * k[..., :, None] * v[..., None, :]
    n = f[..., None] * n + i[..., None] * k
    den = (n * q).sum(-1).abs().maximum((-m_new).exp()) + EPS  # (B, N)
    return torch.einsum("bnkv,bnk->bnv", C, q) / den[..., None], (C, n, m_new)


def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    log_f: Tensor,
    state: State,
    resets: Tensor | None,
    chunk: int,
    compiled: bool = False,
) -> tuple[Tensor, State]:
    """The mLSTM over a window in chunks of `chunk` steps: q (scaled), k, v (B, N, T, d), i~,
    log f (B, N, T), state (C, n, m), resets (B, T) -> h~ (B, N, T, d) and the final state.
    `compiled`: each chunk through torch.compile (matrix.in_chunks)."""
    return in_chunks(_chunk, (q, k, v, i, log_f), state, resets, chunk, compiled)


def _chunk(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, log_f: Tensor, state: State, resets: Tensor | None
) -> tuple[Tensor, State]:
    """One chunk of c steps: q, k, v (B, N, c, d), i~, log f (B, N, c), state (C, n, m), resets
    (B, c) -> outputs (B, N, c, d) and the state after the chunk (module docstring)."""
    C0, n0, m0 = state
    B, _, c, _ = q.shape
    seg = segments(resets, B, c, q.device)
    b = log_f.cumsum(-1)  # (B, N, c)
    # log weight of the state entering step t's segment: b_t - b_{start - 1}, plus m0 if carried
    before = (b - log_f).gather(-1, seg.start.expand_as(b))  # (B, N, c): b_{start - 1}
    a = b - before + m0[..., None] * seg.first
    D = torch.where(seg.same, pairwise_sums(log_f) + i[..., None, :], -math.inf)  # (B, N, c, c)
    m = torch.maximum(a, D.amax(-1))  # (B, N, c)
    w = (D - m[..., None]).exp()  # (B, N, c, c)
    carried = (a - m).exp() * seg.first  # (B, N, c)
    scores = (q @ k.transpose(-1, -2)) * w  # (B, N, c, c)
    num = carried[..., None] * (q @ C0) + scores @ v  # (B, N, c, d)
    den = carried * (q @ n0[..., None])[..., 0] + scores.sum(-1)  # (B, N, c)
    h = num / (den.abs().maximum((-m).exp()) + EPS)[..., None]
    last = w[..., -1, :, None]  # (B, N, c, 1): each write's weight at the chunk's end
    C = carried[..., -1, None, None] * C0 + (k * last).transpose(-1, -2) @ v
    n = carried[..., -1, None] * n0 + (k * last).sum(-2)
    return h, (C, n, m[..., -1])


def _layer(i: int, h: int, options: dict[str, object], backend: str) -> MLSTM:
    """One layer from model.num_heads, the cell's default if unset."""
    return MLSTM(i, h, int(options.get("num_heads") or DEFAULT_HEADS), backend)


for _backend in ("modular", "compile"):
    register("mlstm", _backend, ("num_heads",))(stack_builder(_backend, _layer))
