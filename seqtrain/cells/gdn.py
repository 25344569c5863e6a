"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025): a matrix state written by the gated
delta rule, registered as ``model.cell=gdn`` (backends ``modular``, ``compile``, and ``fla`` on
CUDA: fla_backend.py).

Per head (head size d, S of shape (d_k, d_v) = (d, d)), from the layer input x_t:

    q_t, k_t, v_t = SiLU(ShortConv(W_q x, W_k x, W_v x))   (a depthwise causal conv, K steps)
    q_t <- q_t / |q_t| / sqrt(d),  k_t <- k_t / |k_t|       (L2-normalised)
    beta_t = sigmoid(w_b x_t),  alpha_t = exp(g_t),  g_t = -exp(A_log) softplus(w_a x_t + dt_bias)
    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t
    y_t = W_out (RMSNorm(o_t) * SiLU(W_g x_t))              (per-head RMSNorm, output gate)

(flash-linear-attention's naive_recurrent_gated_delta_rule and GatedDeltaNet layer use the same
convention: decay, then the delta update with the decayed S, then the read.)

The chunk form uses the WY / UT representation (Yang et al.): inside a chunk with entering state
S0, gamma_t = prod_{s <= t} alpha_s and D_ts = gamma_t / gamma_s (s <= t, same segment), the
update vectors u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t) solve the unit lower-triangular system

    (I + A) U = diag(beta) V - diag(beta gamma) K S0,   A_ts = beta_t D_ts k_t.k_s  (s < t)

so U = U0 - W S0 with U0, W from one triangular solve that does not depend on S0; then
o = diag(gamma) Q S0 + ((Q K^T) * D) U and S_c = gamma_c S0 + (K * D_c.)^T U.

State: ``(S, tail)``, ``S (num_layers, B, heads, d, d)`` and ``tail (num_layers, B, K - 1, 3H)``
the convolution's last K - 1 inputs (q, k, v channels); zero = a fresh stream.

Parameters per layer: ``proj`` (I -> 3H, rows q, k, v; no bias), ``conv.weight (3H, K)``,
``gates`` (I -> 2 heads, rows beta, a; no bias), ``A_log`` and ``dt_bias`` (heads),
``gate_out`` (I -> H, no bias), ``norm.weight`` (d), ``proj_out`` (H -> H, no bias). Init:
nn.Linear's for the linears, A uniform in [1, 16], dt = softplus(dt_bias) log-uniform in
[0.001, 0.1] (fla's).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells import fla_backend
from seqtrain.cells.base import State, register
from seqtrain.cells.matrix import (
    DEFAULT_HEADS,
    MatrixLayer,
    ShortConv,
    at_least_float32,
    in_chunks,
    pairwise_sums,
    segments,
    stack_builder,
)

DEFAULT_CONV = 4  # model.conv_size unset: fla's short convolution of 4 steps


class GatedDeltaNet(MatrixLayer):
    """One Gated DeltaNet layer (module docstring)."""

    RUNS = {**MatrixLayer.RUNS, "fla": "fla's Triton chunk kernel"}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_heads: int,
        conv_size: int = DEFAULT_CONV,
        backend: str = "modular",
    ) -> None:
        super().__init__(input_size, hidden_size, num_heads, backend)
        if conv_size < 1:
            raise ValueError(f"model.conv_size={conv_size} must be at least 1")
        H, N = hidden_size, num_heads
        self.conv_size = conv_size
        self.proj = nn.Linear(input_size, 3 * H, bias=False)
        self.conv = ShortConv(3 * H, conv_size)
        self.gates = nn.Linear(input_size, 2 * N, bias=False)
        self.A_log = nn.Parameter(torch.empty(N))
        self.dt_bias = nn.Parameter(torch.empty(N))
        self.gate_out = nn.Linear(input_size, H, bias=False)
        self.norm = nn.RMSNorm(self.head_size, eps=1e-5)
        self.proj_out = nn.Linear(H, H, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            lo, hi = math.log(1e-3), math.log(1e-1)
            dt = torch.empty_like(self.dt_bias).uniform_(lo, hi).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], ...]:
        N, d = self.num_heads, self.head_size
        return (batch, N, d, d), (batch, self.conv_size - 1, 3 * self.hidden_size)

    def saved_per_step(self, batch: int, chunk: int) -> int:
        """Floating elements autograd keeps per step in the chunk form, fitted to saved-tensor
        hooks (tests/test_matrix_cells.py keeps it within 30%): about 26 H for the projections,
        convolution, gates and output, and per head (c, c) matrices (6 c) and the entering
        state (d^2 / c) of each chunk."""
        H, N, d = self.hidden_size, self.num_heads, self.head_size
        return batch * (26 * H + 6 * N * chunk + N * d * d // chunk)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The convolution's input, beta and the log decay g: (B, T, 3H), (B, T, N) twice."""
        u = at_least_float32(self.proj(x))
        b, a = at_least_float32(self.gates(x)).chunk(2, -1)
        g = -self.A_log.exp() * F.softplus(a + self.dt_bias)
        return u, torch.sigmoid(b), g

    def _qkv(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., 3H) convolved -> q, k, v (..., N, d), q and k normalised, q scaled."""
        q, k, v = F.silu(c).unflatten(-1, (3, self.num_heads, self.head_size)).unbind(-3)
        q = F.normalize(q, dim=-1, eps=1e-6) * self.head_size**-0.5
        return q, F.normalize(k, dim=-1, eps=1e-6), v

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o (..., N, d) read from the state, x the layer input -> (..., H)."""
        gate = F.silu(self.gate_out(x)).unflatten(-1, (self.num_heads, self.head_size))
        return self.proj_out((self.norm(o) * gate).flatten(-2))

    def step(self, x_t: Tensor, state: State, reset: Tensor | None) -> tuple[Tensor, State]:
        S, tail = state  # (B, N, d, d), (B, K - 1, 3H)
        if reset is not None:
            keep = ~reset
            S, tail = S * keep[:, None, None, None], tail * keep[:, None, None]
        u, beta, g = self._inputs(x_t)  # (B, 3H), (B, N) twice
        c, tail = self.conv.step(u, tail.to(u.dtype))
        q, k, v = self._qkv(c)  # (B, N, d) each
        o, S = delta_rule_step(q, k, v, beta, g, S.to(u.dtype))
        return self._output(o, x_t), (S, tail)

    def window(
        self, x: Tensor, state: State, resets: Tensor | None, chunk: int
    ) -> tuple[Tensor, State]:
        S, tail = state
        u, beta, g = self._inputs(x)  # (B, T, 3H), (B, T, N) twice
        c, tail = self.conv(u, tail, resets)
        q, k, v = (t.transpose(1, 2) for t in self._qkv(c))  # (B, N, T, d) each
        beta, g = beta.transpose(1, 2), g.transpose(1, 2)  # (B, N, T)
        recurrence = RECURRENCES[self.backend]
        with torch.autocast(x.device.type, enabled=False):  # the recurrence in float32 or more
            o, S = recurrence(q, k, v, beta, g, S.to(u.dtype), resets, chunk)
        return self._output(o.transpose(1, 2), x), (S, tail)


def delta_rule_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, S: Tensor
) -> tuple[Tensor, Tensor]:
    """One step of the gated delta rule: q, k, v (B, N, d), beta, g (B, N), S (B, N, d, d) ->
    o = S_t^T q (B, N, d) and S_t: decay, then the delta update with the decayed state."""
    S = S * g.exp()[..., None, None]
    delta = beta[..., None] * (v - torch.einsum("bnkv,bnk->bnv", S, k))  # (B, N, d)
    S = S + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bnkv,bnk->bnv", S, q), S


def delta_rule_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    S: Tensor,
    resets: Tensor | None,
    chunk: int,
    compiled: bool = False,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule over a window in chunks of `chunk` steps: q, k, v (B, N, T, d),
    beta, g (B, N, T), S (B, N, d, d) the initial state, resets (B, T) -> o (B, N, T, d), S_T.
    `compiled`: each chunk through torch.compile (matrix.in_chunks)."""
    return in_chunks(_chunk, (q, k, v, beta, g), S, resets, chunk, compiled)


# model.backend -> the chunk form's recurrence (delta_rule_chunkwise's arguments)
RECURRENCES = {
    "modular": delta_rule_chunkwise,
    "compile": functools.partial(delta_rule_chunkwise, compiled=True),
    "fla": fla_backend.gated_delta_rule,
}


def _chunk(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, S0: Tensor, resets: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One chunk of c steps: q, k, v (B, N, c, d), beta, g (B, N, c), S0 (B, N, d, d), resets
    (B, c) -> outputs (B, N, c, d) and the state after the chunk (module docstring)."""
    B, _, c, _ = q.shape
    seg = segments(resets, B, c, q.device)
    G = g.cumsum(-1)  # (B, N, c): log gamma
    D = torch.where(seg.same, pairwise_sums(g), -math.inf).exp()  # (B, N, c, c): gamma_t / gamma_s
    gamma = G.exp() * seg.first  # (B, N, c): the carried state reaches the first segment only
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    A = (beta[..., None] * D * (k @ k.transpose(-1, -2))).masked_fill(~strict, 0.0)
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gamma)[..., None] * k], -1)  # (B, N, c, 2d)
    U0, W = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).chunk(
        2, -1
    )
    U = U0 - W @ S0  # (B, N, c, d): the update vectors u_t
    o = gamma[..., None] * (q @ S0) + ((q @ k.transpose(-1, -2)) * D) @ U
    S = gamma[..., -1, None, None] * S0 + (k * D[..., -1, :, None]).transpose(-1, -2) @ U
    return o, S


def _layer(i: int, h: int, options: dict[str, object], backend: str) -> GatedDeltaNet:
    """One layer from model.num_heads and model.conv_size, the cell's defaults if unset."""
    heads = int(options.get("num_heads") or DEFAULT_HEADS)
    return GatedDeltaNet(i, h, heads, int(options.get("conv_size") or DEFAULT_CONV), backend)


OPTIONS = ("num_heads", "conv_size")
for _backend in ("modular", "compile"):
    register("gdn", _backend, OPTIONS)(stack_builder(_backend, _layer))
register("gdn", "fla", OPTIONS, device=fla_backend.DEVICE, ready=fla_backend.missing)(
    stack_builder("fla", _layer)
)
