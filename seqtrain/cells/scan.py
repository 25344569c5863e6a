"""Recurrences that train by parallel scan: minGRU, minLSTM (Feng et al. 2024) and RG-LRU (De et al.
2024). (The pre-norm residual block that wraps them, or any recurrent core, is blocks.py.)

All three are diagonal linear recurrences whose coefficients depend on the current input only:

    h_t = a_t * h_{t-1} + b_t,        a_t in [0, 1],  a_t, b_t functions of x_t alone

    minGRU   z_t = sigmoid(k_z),  a_t = 1 - z_t,  b_t = z_t * g(k_h)
    minLSTM  f_t = sigmoid(k_f),  i_t = sigmoid(k_i),  a_t = f_t / (f_t + i_t),
             b_t = i_t / (f_t + i_t) * g(k_h)
    RG-LRU   u_t = W_in x_t + b_in,  r_t = sigmoid(k_r),  i_t = sigmoid(k_i)  ((k_r, k_i) from u_t),
             a_t = sigmoid(Lambda)^(c r_t)  (c = 8),  b_t = sqrt(1 - a_t^2) * i_t * u_t

with (k_z, k_h) = W x_t + b (and likewise for the other gates) and g(v) = v + 0.5 for v >= 0,
sigmoid(v) otherwise. The coefficients are Feng et al.'s log-space values, exponentiated, in the
forms that need no log/exp round trip: exp(-softplus(k)) = sigmoid(-k) is 1 - z without the
cancellation, the minLSTM normalisation is sigmoid(log f - log i) with log f = -softplus(-k_f) (no
0 / 0 when both gates underflow), and the RG-LRU's log a_t = -c r_t softplus(-Lambda) gives
sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t)), accurate as a_t -> 1. These keep fewer tensors for
backward than the log/exp chains (tests/test_scan.py checks them against the log-space formulas).

Why the scan runs in linear space, in chunks, and not as Feng et al.'s log-space (Heinsen) scan
``log h_t = A_t + logcumsumexp(log b_s - A_s)`` with ``A_t = cumsum(log a)``:
  * it cancels: A_t grows like t * mean(log a), and adding two numbers of that size in float32
    leaves an absolute error of eps * |A_t| in log h_t, a relative error in h_t that grows with
    T however small the true contributions (docs/bench_scan.md has it measured);
  * it needs b_t > 0 and h_0 > 0: the RG-LRU's b_t and a carried state of any sign need a sign
    split (two scans);
  * a reset (a_t = 0, log a_t = -inf) turns A_t - A_s into -inf - (-inf) = NaN.
The two-level chunked scan below multiplies numbers in [0, 1] and adds, exactly like the step
loop; only the grouping differs (chunk-local results combined once per chunk boundary), so it
agrees with the step form to rounding for any T, any signs, and exact zeros. It is O(T) work with
about 2 sqrt(T) Python-level steps instead of T, so it is fast on CPU (memory-bound) and issues
few launches on GPU. Its backward is the same scan run backwards in time (a custom autograd
function), so backward keeps only a_t and h_t per step, not the scan's intermediates.

Resets: at a reset position t of stream n, h_{t-1} is treated as 0 for that stream (a_t := 0), so
the stream continues exactly as a fresh run from t with a zero state, inside one window.

Registered as ``model.cell=mingru | minlstm | rglru`` with ``model.backend=modular`` or
``compile`` (which compiles each layer's coefficients; no cell options: the math is the
paper's). Shapes follow the rest of seqtrain (see the package): batch-first ``forward(x: (B, T,
I), state) -> (y: (B, T, H), state)``; ``state`` is the plain tuple ``(h,)`` with ``h:
(num_layers, B, H)``; zero state when None. Coefficients and the scan run in float32 at least
(float64 stays float64), so under bf16 autocast only the projections run in bf16 and the T-step
accumulation does not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells.base import State, check_window, register
from seqtrain.cells.compiled import CompiledStep, tensor_key

FORMS = ("blocked", "scan", "step")
RGLRU_C = 8.0  # Griffin's fixed exponent scale c: a_t = a^(c r_t)


# ---------------------------------------------------------------------------------------------
# The scan: h_t = a_t * h_{t-1} + b_t over a whole window
# ---------------------------------------------------------------------------------------------


def _scan_forward(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t for t = 0..T-1 from h_{-1} = h0, without autograd.

    Two levels over chunks of C = ceil(sqrt(T)) steps: (1) every chunk from a zero start, all
    chunks at once, one step of the chunk at a time (C steps); (2) the chunk start states, one
    chunk at a time (T / C steps); then h_t += (prod of a within the chunk up to t) * start."""
    B, T, H = a.shape
    C = math.isqrt(T - 1) + 1 if T > 1 else 1  # ceil(sqrt(T)): C + T / C steps is least
    n = -(-T // C)  # chunks
    if n * C != T:  # pad the end: steps after T cannot change earlier ones
        a = F.pad(a, (0, 0, 0, n * C - T))
        b = F.pad(b, (0, 0, 0, n * C - T))
    a = a.reshape(B, n, C, H)
    b = b.reshape(B, n, C, H)
    h = torch.empty_like(b)  # (B, n, C, H): chunk-local states, then the states
    h[:, :, 0] = b[:, :, 0]
    for j in range(1, C):
        torch.addcmul(b[:, :, j], a[:, :, j], h[:, :, j - 1], out=h[:, :, j])
    decay = torch.cumprod(a, dim=2)  # (B, n, C, H): prod_{s <= j} a_s within the chunk
    starts = torch.empty_like(h[:, :, 0])  # (B, n, H): the state entering each chunk
    s = h0
    for k in range(n):
        starts[:, k] = s
        s = torch.addcmul(h[:, k, -1], decay[:, k, -1], s)
    h.addcmul_(decay, starts[:, :, None])
    return h.reshape(B, n * C, H)[:, :T]


class _LinearScan(torch.autograd.Function):
    """Autograd for the scan. With G_t = dL/dh_t in total (direct plus through h_{t+1}):

        G_t = g_t + a_{t+1} G_{t+1}   (a reverse-time scan of the same form),
        dL/db_t = G_t,  dL/da_t = G_t h_{t-1},  dL/dh0 = a_0 G_0.

    The backward calls this function again, so it is itself differentiable (double backward)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        with torch.no_grad():
            h = _scan_forward(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h, h0 = ctx.saved_tensors
        a_next = F.pad(a[:, 1:], (0, 0, 0, 1))  # (B, T, H): a_{t+1}, 0 after the last step
        G = _LinearScan.apply(a_next.flip(1), grad_h.flip(1), torch.zeros_like(h0)).flip(1)
        h_prev = torch.cat([h0[:, None], h[:, :-1]], dim=1)  # (B, T, H): h_{t-1}
        return G * h_prev, G, a[:, 0] * G[:, 0]


def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t, h_{-1} = h0: a, b (B, T, H), h0 (B, H) -> (B, T, H).

    Differentiable in a, b and h0; keeps a and the states for backward."""
    return _LinearScan.apply(a, b, h0)


# ---------------------------------------------------------------------------------------------
# The blocked scan: coefficients and recurrence together, a cache-sized block of steps at a time
# ---------------------------------------------------------------------------------------------

BLOCK_BYTES = 1 << 20  # one block's (B, block, H) float32 coefficients: within a core's L2


def block_steps(batch: int, hidden: int) -> int:
    """Steps per block: a block's a_t (or b_t, or h_t) stays in cache while it is used."""
    return max(1, min(64, BLOCK_BYTES // (4 * max(1, batch * hidden))))


# (a_t, b_t) from k and the parameters they read, passed in: backward recomputes them with the
# very tensors forward used (under torch.func.functional_call the module's own are others).
Coefficients = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]]


class _BlockedScan(torch.autograd.Function):
    """h_t = a_t h_{t-1} + b_t with (a_t, b_t) = coefficients(k_t, params), a block at a time.

        The chunked scan computes a and b for the whole window and streams each (B, T, H) tensor
    through main memory several times; here a block's a and b are made, used and dropped while
    in cache. Forward keeps only k (the projection, which autograd would keep anyway) and h (the
    output). Backward runs the blocks in reverse: it recomputes the block's coefficients with
    autograd (elementwise work, cheaper than keeping a and b), runs the reverse-time scan of the
    gradient G_t = g_t + a_{t+1} G_{t+1} through the block, and backpropagates (G h_{t-1}, G)
    through the coefficients. Not twice differentiable: `form="scan"` is, for the rare use that
    needs it.
    """

    @staticmethod
    def forward(ctx, k, h0, resets, coefficients, block, *params):  # noqa: ANN001
        B, T = k.shape[:2]
        with torch.no_grad():
            h = None
            s = h0
            for start in range(0, T, block):
                a, b = _block_gates(coefficients, params, k, resets, start, block)  # (B, n, H)
                if h is None:
                    h = a.new_empty(B, T, a.shape[-1])  # (B, T, H)
                    s = s.to(a.dtype)
                out = h[:, start : start + a.shape[1]]
                for t in range(a.shape[1]):
                    s = torch.addcmul(b[:, t], a[:, t], s, out=out[:, t])
        ctx.save_for_backward(k, h0, h, resets, *params)
        ctx.coefficients, ctx.block = coefficients, block
        ctx.autocast = _autocast_state(k.device.type)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):  # noqa: ANN001
        k, h0, h, resets, *params = ctx.saved_tensors
        B, T = k.shape[:2]
        dk = torch.empty_like(k)
        dparams: list[Tensor | None] = [None] * len(params)
        carry = torch.zeros_like(h[:, 0])  # a_{t+1} G_{t+1}: zero after the last step
        G = torch.empty_like(h[:, :1])
        for start in reversed(range(0, T, block := ctx.block)):
            stop = min(T, start + block)
            kb = k[:, start:stop].detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(k.device.type, *ctx.autocast):
                a, b = _block_gates(ctx.coefficients, params, kb, resets, start, block, start)
            if G.shape[1] != stop - start:
                G = h.new_empty(B, stop - start, h.shape[-1])  # (B, n, H)
            g = grad_h[:, start:stop]
            ad = a.detach()
            for t in reversed(range(stop - start)):
                torch.add(g[:, t], carry, out=G[:, t])
                carry = ad[:, t] * G[:, t]
            before = h0.to(h.dtype)[:, None] if start == 0 else h[:, start - 1 : start]
            h_prev = torch.cat([before, h[:, start : stop - 1]], dim=1)  # (B, n, H): h_{t-1}
            grads = torch.autograd.grad((a, b), [kb, *params], (G * h_prev, G), allow_unused=True)
            dk[:, start:stop] = grads[0]
            for i, d in enumerate(grads[1:]):
                if d is not None:
                    dparams[i] = d if dparams[i] is None else dparams[i] + d
        dh0 = carry.to(h0.dtype)  # a_0 G_0
        return (dk, dh0, None, None, None, *dparams)


def _block_gates(
    coefficients: Coefficients,
    params: tuple[Tensor, ...],
    k: Tensor,
    resets: Tensor | None,
    start: int,
    block: int,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The coefficients of steps start : start + block (of k itself when `offset` says k is that
    block already), a_t zeroed where a stream resets."""
    kb = k[:, start - offset : start - offset + block]
    a, b = coefficients(kb, params)
    if resets is not None:
        a = a.masked_fill(resets[:, start : start + kb.shape[1], None], 0.0)
    return a, b


def _autocast_state(device_type: str) -> tuple[object, bool]:
    """(dtype, enabled) of autocast now: backward recomputes the coefficients as forward did."""
    return torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


def blocked_scan(
    k: Tensor,
    h0: Tensor,
    coefficients: Coefficients,
    params: tuple[Tensor, ...] = (),
    resets: Tensor | None = None,
    block: int | None = None,
) -> Tensor:
    """All states of h_t = a_t h_{t-1} + b_t, (a_t, b_t) = coefficients(k_t, params): k (B, T, K)
    with T >= 1, h0 (B, H) -> (B, T, H). `params`: the parameters `coefficients` reads (they get
    their gradients); resets (B, T) bool zero a_t where a stream starts over. Differentiable once
    in k, h0 and params."""
    block = block or block_steps(k.shape[0], h0.shape[-1])
    return _BlockedScan.apply(k, h0, resets, coefficients, block, *params)


# ---------------------------------------------------------------------------------------------
# Cells: each computes its a_t, b_t; the recurrence itself is shared
# ---------------------------------------------------------------------------------------------


def g(v: Tensor) -> Tensor:
    """Feng et al.'s candidate activation: v + 0.5 for v >= 0, sigmoid(v) below; positive and
    continuous, so minGRU / minLSTM states stay positive (their log-space scan needs it).
    Written as max(v + 0.5, sigmoid(v)), the same function (v + 0.5 - sigmoid(v) is increasing
    and 0 at v = 0) in two passes fewer and without a mask kept for backward."""
    return torch.maximum(v + 0.5, torch.sigmoid(v))


def _at_least_float32(t: Tensor) -> Tensor:
    """float32 at least: under autocast the projections may be bf16; the recurrence never is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class ScanCell(nn.Module):
    """One layer of a diagonal linear recurrence h_t = a_t * h_{t-1} + b_t over a window.

    Subclasses define `project(x) -> k` (the input projection: one GEMM over the window) and
    `from_projection(k, params) -> (a, b)` (the per-step math: elementwise, and RG-LRU's gate
    GEMM, from the parameters `coefficient_parameters` gives, passed in). Everything else is shared:
    the blocked form (`blocked_scan`: training), the chunked scan form (`linear_scan`: a
    reference, and twice differentiable) and the step form (a loop over `step`: the
    specification, and what sampling calls)."""

    # What autograd keeps per step and stream for one layer, in units of H: floating tensors in
    # the scan form (the states h_t and a_t among them), and in the blocked form (k and h_t).
    # The layer's input is not counted: it is the batch, or the states of the layer below.
    saved_floats: int
    blocked_floats: int

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size

    def project(self, x: Tensor) -> Tensor:
        """k of every step: x (B, T, I) -> (B, T, K), float32 at least."""
        raise NotImplementedError

    def from_projection(self, k: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """a_t, b_t of every step: k (B, T, K) and `coefficient_parameters()` -> two (B, T, H),
        float32 at least."""
        raise NotImplementedError

    def coefficient_parameters(self) -> tuple[nn.Parameter, ...]:
        """The parameters `from_projection` reads (the blocked form's backward needs them)."""
        return ()

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """a_t, b_t of every step: x (B, T, I) -> two (B, T, H), float32 at least."""
        return self.from_projection(self.project(x), self.coefficient_parameters())

    def step(self, x_t: Tensor, h: Tensor, reset: Tensor | None = None) -> Tensor:
        """One step: x_t (B, I), h (B, H), reset (B,) bool -> the next h (B, H)."""
        a, b = self.coefficients(x_t[:, None])  # (B, 1, H) each
        a, b = a[:, 0], b[:, 0]
        if reset is not None:
            a = a.masked_fill(reset[:, None], 0.0)
        return a * h.to(a.dtype) + b

    def forward(
        self,
        x: Tensor,
        h0: Tensor,
        resets: Tensor | None = None,
        form: str = "blocked",
        coefficients: Coefficients | None = None,
        block: int | None = None,
    ) -> Tensor:
        """All states (B, T, H) from x (B, T, I) and h0 (B, H); resets (B, T) bool.
        `coefficients` replaces from_projection in the blocked and scan forms (compiled);
        `block`: the blocked form's steps per block (None: `block_steps`)."""
        if form == "step":
            h = h0
            out = []
            for t in range(x.shape[1]):
                h = self.step(x[:, t], h, None if resets is None else resets[:, t])
                out.append(h)
            return torch.stack(out, dim=1)
        k = self.project(x)  # (B, T, K)
        made, params = coefficients or self.from_projection, self.coefficient_parameters()
        if form == "blocked":
            return blocked_scan(k, h0, made, params, resets, block)
        a, b = made(k, params)  # (B, T, H) each
        if resets is not None:
            a = a.masked_fill(resets[..., None], 0.0)
        return linear_scan(a, b, h0.to(a.dtype))


class MinGRU(ScanCell):
    """minGRU: h_t = (1 - z_t) h_{t-1} + z_t g(k_h), z_t = sigmoid(k_z), (k_z, k_h) = W x_t + b.

    Parameters: ``proj`` (nn.Linear I -> 2H; rows z, h). Init: nn.Linear's, U(+-1/sqrt(I)) for
    weight and bias."""

    saved_floats = 6  # a, z, g, max's two inputs in g, h
    blocked_floats = 3  # k (2H), h

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.proj = nn.Linear(input_size, 2 * hidden_size)

    def project(self, x: Tensor) -> Tensor:
        return _at_least_float32(self.proj(x))  # (B, T, 2H)

    def from_projection(self, k: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        k_z, k_h = k.chunk(2, dim=-1)  # (B, T, H) each
        # exp(-softplus(k_z)) = 1 - z without the cancellation; exp(-softplus(-k_z)) = z
        return torch.sigmoid(-k_z), torch.sigmoid(k_z) * g(k_h)


class MinLSTM(ScanCell):
    """minLSTM: h_t = f'_t h_{t-1} + i'_t g(k_h), with f_t = sigmoid(k_f), i_t = sigmoid(k_i),
    f' = f / (f + i), i' = i / (f + i) (the normalisation that makes the state's scale independent
    of T), (k_f, k_i, k_h) = W x_t + b.

    Parameters: ``proj`` (nn.Linear I -> 3H; rows f, i, h). Init: nn.Linear's, U(+-1/sqrt(I))."""

    saved_floats = 8  # -k_f, -k_i, a, i', g, max's two inputs in g, h
    blocked_floats = 4  # k (3H), h

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.proj = nn.Linear(input_size, 3 * hidden_size)

    def project(self, x: Tensor) -> Tensor:
        return _at_least_float32(self.proj(x))  # (B, T, 3H)

    def from_projection(self, k: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        k_f, k_i, k_h = k.chunk(3, dim=-1)  # (B, T, H) each
        # f' = f / (f + i) = sigmoid(log f - log i), i' = sigmoid(log i - log f): no 0 / 0 when
        # both gates underflow, with log sigmoid(k) = -softplus(-k)
        d = F.softplus(-k_i) - F.softplus(-k_f)  # log f - log i
        return torch.sigmoid(d), torch.sigmoid(-d) * g(k_h)


class RGLRU(ScanCell):
    """Griffin's real-gated linear recurrent unit, after an input projection u_t = W_in x_t + b_in:

        r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_x u_t + b_x),  a_t = sigmoid(Lambda)^(c r_t),
        h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t),   c = 8.

    The projection is always there (not only when I != H): the value path i_t u_t is elementwise,
    so without it a stack of RG-LRUs would never mix channels in its values; it is Griffin's
    linear branch in front of the RG-LRU. (Griffin's temporal conv is not included.)

    Parameters: ``proj_in`` (nn.Linear I -> H), ``gates`` (nn.Linear H -> 2H; rows a (recurrence
    gate r), x (input gate i)), ``decay_logit`` Lambda (H). Init: nn.Linear's for both linears;
    Lambda such that a^c is uniform in [0.9, 0.999] (Griffin), memory of 10 to 1000 steps."""

    saved_floats = 8  # u, r, a, expm1, sqrt, i, i * u, h
    blocked_floats = 2  # u, h

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.proj_in = nn.Linear(input_size, hidden_size)
        self.gates = nn.Linear(hidden_size, 2 * hidden_size)
        self.decay_logit = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            a = torch.empty_like(self.decay_logit).uniform_(0.9, 0.999) ** (1.0 / RGLRU_C)
            self.decay_logit.copy_(torch.log(a) - torch.log1p(-a))  # logit(a)

    def project(self, x: Tensor) -> Tensor:
        return _at_least_float32(self.proj_in(x))  # u: (B, T, H)

    def coefficient_parameters(self) -> tuple[nn.Parameter, ...]:
        return (self.gates.weight, self.gates.bias, self.decay_logit)

    def from_projection(self, u: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        weight, bias, decay_logit = params  # gates.weight, gates.bias, decay_logit
        k_r, k_i = _at_least_float32(F.linear(u, weight, bias)).chunk(2, dim=-1)  # (B, T, H) each
        log_a = (-RGLRU_C * F.softplus(-decay_logit)) * torch.sigmoid(k_r)  # c r log sigmoid(L)
        # sqrt(1 - a^2) = sqrt(-expm1(2 log a)) without the cancellation as a -> 1; + tiny keeps
        # the gradient finite at a = 1 exactly (r or softplus(-Lambda) underflowing to 0)
        norm = torch.sqrt(torch.finfo(log_a.dtype).tiny - torch.expm1(2 * log_a))
        return log_a.exp(), norm * (torch.sigmoid(k_i) * u)


SCAN_CELLS: dict[str, type[ScanCell]] = {"mingru": MinGRU, "minlstm": MinLSTM, "rglru": RGLRU}


# ---------------------------------------------------------------------------------------------
# The stack: seqtrain's forward contract
# ---------------------------------------------------------------------------------------------


class ScanStack(nn.Module):
    """`num_layers` scan cells, each feeding the next; batch-first.

    ``forward(x: (B, T, I), state: (h,) | None, resets: (B, T) bool | None) -> (y: (B, T, H),
    (h,))`` with ``h: (num_layers, B, H)`` the final states; zero state when None.
    ``form="blocked"`` (the default) trains by the blocked scan, ``form="scan"`` by the chunked
    scan (a reference, twice differentiable), ``form="step"`` loops over time (the
    specification). Parameters:
    ``layers.{k}.*`` as named by the cell (see MinGRU, MinLSTM, RGLRU).

    ``resets_inside``: the scan drops a stream's carried state at its document starts itself, so
    the engine passes a window's resets instead of cutting it into segments there."""

    num_states = 1
    resets_inside = True

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        form: str = "blocked",
        backend: str = "modular",
        block: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in SCAN_CELLS:
            raise ValueError(f"cell={cell!r} is unknown; choose one of {', '.join(SCAN_CELLS)}")
        if form not in FORMS:
            raise ValueError(f"form={form!r} is unknown; choose one of {', '.join(FORMS)}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be at least 1")
        self.cell, self.form, self.backend, self.block = cell, form, backend, block
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(SCAN_CELLS[cell](i, hidden_size) for i in sizes)

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def kernel(self, device: torch.device) -> str:
        """What runs, for the startup log (cells.kernel_name)."""
        coefficients = "torch.compile (inductor)" if self.backend == "compile" else "python"
        return f"linear recurrence ({self.form} form), {coefficients} coefficients"

    def state_shapes(self, batch: int) -> tuple[tuple[int, int, int]]:
        """Shapes of the state tuple: one (num_layers, B, H) tensor."""
        return ((self.num_layers, batch, self.hidden_size),)

    def activation_elements_per_step(self, batch: int) -> int:
        """Floating elements autograd keeps per time step for backward, all layers: B * L * H *
        `blocked_floats` in the blocked form (the projection k and h: 3 minGRU, 4 minLSTM, 2
        RG-LRU), `saved_floats` in the scan form (6, 8, 8: every coefficient's intermediates).
        The input batch is not counted.
        tests/test_scan.py checks both against autograd's saved-tensor hooks. The step form
        keeps slightly more than the scan form (its per-step graph)."""
        layer = self.layers[0]
        per_h = layer.blocked_floats if self.form == "blocked" else layer.saved_floats
        return batch * self.num_layers * self.hidden_size * per_h

    def _check(self, x: Tensor, state: State | None, resets: Tensor | None) -> None:
        B, T = check_window(x, self.input_size, resets)
        if state is not None:
            if not isinstance(state, tuple) or len(state) != 1:
                raise ValueError(f"state must be a tuple (h,), got {type(state).__name__}")
            want = self.state_shapes(B)[0]
            if tuple(state[0].shape) != want:
                raise ValueError(
                    f"state h must be (num_layers, B, H) = {want}, got {tuple(state[0].shape)}"
                )

    def forward(
        self, x: Tensor, state: State | None = None, resets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        self._check(x, state, resets)
        B = x.shape[0]
        if state is None:
            h0 = x.new_zeros(
                self.state_shapes(B)[0], dtype=torch.promote_types(x.dtype, torch.float32)
            )
        else:
            h0 = state[0]
        finals = []
        y = x
        for k, layer in enumerate(self.layers):
            coefficients = None
            if self.backend == "compile":
                coefficients = functools.partial(_compiled_coefficients, layer)
            y = layer(y, h0[k], resets, self.form, coefficients, self.block)  # (B, T, H)
            finals.append(y[:, -1])
        return y, (torch.stack(finals),)


def _from_projection(
    layer: ScanCell, k: Tensor, params: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """The gate math of one layer: what `compile` fuses (the projection is one GEMM already, and
    the scan stays eager: its Python loop would unroll into the graph)."""
    return layer.from_projection(k, params)


def _compiled_coefficients(
    layer: ScanCell, k: Tensor, params: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """`_from_projection` compiled: one graph per cell type and per shape, grad and autocast
    mode of k (the blocked form calls it per block, without grad forward and with it backward)."""
    compiled = _COMPILED.setdefault(
        type(layer), CompiledStep(_from_projection, f"{type(layer).__name__} coefficients")
    )
    return compiled.get(tensor_key(k))(layer, k, params)


_COMPILED: dict[type, CompiledStep] = {}  # per process, not on the module: it deep-copies


def _builder(backend: str) -> Callable[..., ScanStack]:
    def build(
        cell: str, input_size: int, hidden_size: int, num_layers: int, options: dict[str, object]
    ) -> ScanStack:
        """The registry's builder: the options are all off (no scan registration has any)."""
        return ScanStack(cell, input_size, hidden_size, num_layers, backend=backend)

    return build


for _name in SCAN_CELLS:
    for _backend in ("modular", "compile"):
        register(_name, _backend, ())(_builder(_backend))
