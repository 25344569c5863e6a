"""The fused time loops: one LSTM / GRU / layer-normed LSTM layer over a window, forward and a
hand-written backward (modular and compile run them when no option needs per-step autograd, jit
runs them scripted).

Why: autograd through a Python time loop records ~10 nodes per step and accumulates dW_hh with T
small matrix products that each read and write the whole (G*H, H) gradient. Here the forward
keeps only activated gates and cell states, the backward computes every factor that does not
depend on the recurrence for all steps at once, loops over time with ~5 ops per step, and forms
dW_hh, dW_ih and the biases after the loop as single (T*B)-deep matrix products.
The loops are TorchScript-compatible so the jit backend scripts the very same code; they take the
backend's loop functions (`loops`, compiled.py) as an argument.
"""

from __future__ import annotations

import platform
from typing import Any, NamedTuple

import torch
from torch import Tensor

from seqtrain.cells.onednn import input_grad, linear_grads, mm_t, pack

# The CPU tanh trick is measured (docs/bench_cells.md) on x86 only.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
SIGMOID_TANH = True  # tests switch it off to run the plain math where it would otherwise run


def sigmoid_tanh(x: Tensor) -> bool:
    """Whether the LSTM loops take tanh(a) as 2 sigmoid(2a) - 1 for the g gate: on x86 CPUs in
    float32 only. There torch.tanh is much slower than torch.sigmoid, so one sigmoid over all four
    gates wins; in bfloat16, sigmoid near 0.5 moves in steps of 2^-8, so 2 sigmoid(2a) - 1 moves in
    steps of 2^-7 near zero where tanh itself is exact to 2^-8 relative: it would lose precision,
    and on GPUs nothing was measured to gain."""
    return SIGMOID_TANH and _X86 and x.device.type == "cpu" and x.dtype == torch.float32


def _double_g(w: Tensor, doubled: bool) -> Tensor:
    """With `doubled`, a copy of w (4H, ...) with the g gate's rows doubled, for the LSTM loops
    below in their sigmoid-tanh variant; else w itself."""
    if not doubled:
        return w
    H = w.shape[0] // 4
    w = w.clone()
    w[2 * H : 3 * H] *= 2
    return w


def _lstm_forward_loop(
    gates: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, doubled: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the recurrence in place: gates (T, B, 4H) holds x W_ih^T + b on entry, i f g o after.

    With `doubled` (sigmoid_tanh) the g gate's pre-activations come doubled (_double_g on W_ih,
    b and w_hh). Returns the gates, the cell states C, their tanh and the outputs Hs, each
    (T, B, H).
    """
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    cs = gates.new_empty((T, B, H))
    tcs = gates.new_empty((T, B, H))
    hs = gates.new_empty((T, B, H))
    # Per-step views made in one call each: slicing inside the loop costs an op per slice.
    g_t, i_t, f_t = gates.unbind(0), gates[:, :, :H].unbind(0), gates[:, :, H : 2 * H].unbind(0)
    gg_t, o_t = gates[:, :, 2 * H : 3 * H].unbind(0), gates[:, :, 3 * H :].unbind(0)
    if_t = gates[:, :, : 2 * H].unbind(0)
    c_t, tc_t, h_t = cs.unbind(0), tcs.unbind(0), hs.unbind(0)
    h, c = h0, c0
    for t in range(T):
        g_t[t].add_(mm_t(h, w_hh))  # (B, 4H)
        if doubled:  # one sigmoid for all four gates, then tanh(a) = 2 sigmoid(2a) - 1
            g_t[t].sigmoid_()
            gg_t[t].mul_(2).sub_(1)
        else:
            if_t[t].sigmoid_()
            o_t[t].sigmoid_()
            gg_t[t].tanh_()
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
        dh = mm_t(d_t[t], w_hh_t)
        if t > 0:
            dh.add_(dy_t[t - 1])
    return d_gates, dh, dc


def _ln_lstm_forward_loop(
    gates: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    g_hh: Tensor,
    g_c: Tensor,
    b_c: Tensor,
    doubled: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The layer-normed LSTM (Ba et al. 2016) in place: gates (T, B, 4H) holds
    LN(x W_ih^T) + b on entry, i f g o after. Each step adds LN(h W_hh^T; g_hh) and outputs
    h = o * tanh(LN(c; g_c, b_c)); the carried c is the un-normed one. As in _lstm_forward_loop,
    the g gate's pre-activations come doubled (gates and g_hh) when `doubled`.

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
    if_t = gates[:, :, : 2 * H].unbind(0)
    hp_t, c_t, tc_t, h_t = hp.unbind(0), cs.unbind(0), tcs.unbind(0), hs.unbind(0)
    stats: list[list[Tensor]] = [[], [], [], []]  # mean, rstd of h W_hh^T; mean, rstd of c
    h, c = h0, c0
    for t in range(T):
        hp_t[t].copy_(mm_t(h, w_hh))
        y, mean, rstd = torch.native_layer_norm(hp_t[t], [4 * H], g_hh, None, 1e-5)
        stats[0].append(mean)
        stats[1].append(rstd)
        # The gate math repeats _lstm_forward_loop's on purpose: a shared helper function cost
        # 7-8% of an update at H512 (a Python call per step; 5 interleaved A/B pairs).
        g_t[t].add_(y)  # (B, 4H)
        if doubled:
            g_t[t].sigmoid_()
            gg_t[t].mul_(2).sub_(1)
        else:
            if_t[t].sigmoid_()
            o_t[t].sigmoid_()
            gg_t[t].tanh_()
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
        dh = mm_t(d_hp_t[t], w_hh_t)
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
        hp = mm_t(h, w_hh).add_(b_hh)  # (B, 3H)
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
        dh = mm_t(d_h[t], w_hh_t).add_(direct)
    return d_x, d_h, dh


def _lstm_step_into(
    g: Tensor, c: Tensor, c_out: Tensor, tc_out: Tensor, h_out: Tensor, doubled: bool
) -> None:
    """One step's LSTM gate math (the compile backend fuses it), written where
    _lstm_forward_loop writes it: g (B, 4H) holds the pre-activations (g block doubled when
    `doubled`) and gets i f g o; c_out, tc_out and h_out (B, H) get c, tanh(c) and h. Writing
    into the window's buffers spares stacking every step's outputs after the loop."""
    if doubled:
        i, f, gg, o = g.sigmoid().chunk(4, 1)
        gg = 2 * gg - 1
    else:
        i, f, gg, o = g.chunk(4, 1)
        i, f, gg, o = i.sigmoid(), f.sigmoid(), gg.tanh(), o.sigmoid()
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


class WindowProjection(torch.autograd.Function):
    """x (T, B, I) -> x W^T (T, B, G*H) for a whole window, on the GEMM mm_t picks (F.linear
    would take torch.mm's, half as fast on CPU here): the hoisted input projection of the
    autograd cells."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, x.shape[2])  # (T*B, I)
        ctx.save_for_backward(x2, w)
        return mm_t(x2, w).view(T, B, w.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor]:
        x2, w = ctx.saved_tensors
        T, B, G = dy.shape
        d2 = dy.reshape(T * B, G)
        dx = input_grad(ctx.needs_input_grad[0], d2, w, T, B)
        (dw,), _ = linear_grads(d2, [x2])
        return dx, dw


class FusedLSTMLayer(torch.autograd.Function):
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
        loops: Any,  # compiled.Loops: the backend's time loops
    ) -> tuple[Tensor, Tensor, Tensor]:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, x.shape[2])  # (T*B, I)
        doubled = sigmoid_tanh(x)
        gates = mm_t(x2, _double_g(w_ih, doubled)).add_(_double_g(b_ih + b_hh, doubled))
        w_hh_d = pack(_double_g(w_hh, doubled), B)
        gates, cs, tcs, hs = loops.lstm_forward(
            gates.view(T, B, w_ih.shape[0]), h0, c0, w_hh_d, doubled
        )
        ctx.save_for_backward(x2, h0, c0, w_ih, w_hh, gates, cs, tcs, hs)
        ctx.loops = loops
        return hs, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dh_n: Tensor, dc_n: Tensor) -> tuple[Tensor | None, ...]:
        x2, h0, c0, w_ih, w_hh, gates, cs, tcs, hs = ctx.saved_tensors
        T, B, G = gates.shape
        w_hh_t = pack(w_hh.t().contiguous(), B)  # (H, 4H)
        d_gates, dh0, dc0 = ctx.loops.lstm_backward(gates, cs, tcs, c0, w_hh_t, dy, dh_n, dc_n)
        d2 = d_gates.view(T * B, G)  # (T*B, 4H)
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]]).view(T * B, h0.shape[1])  # (T*B, H)
        dx = input_grad(ctx.needs_input_grad[0], d2, w_ih, T, B)
        (dw_ih, dw_hh), db = linear_grads(d2, [x2, h_prev])
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


class FusedLNLSTMLayer(torch.autograd.Function):
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
        loops: Any,  # compiled.Loops: the backend's time loops
    ) -> tuple[Tensor, Tensor, Tensor]:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, x.shape[2])  # (T*B, I)
        xw = mm_t(x2, w_ih)  # (T*B, 4H)
        b = b_ih + b_hh
        doubled = sigmoid_tanh(x)
        gates, m_ih, r_ih = torch.native_layer_norm(
            xw, [xw.shape[1]], _double_g(g_ih, doubled), _double_g(b, doubled), 1e-5
        )
        gates, hp, m_hh, r_hh, cs, m_c, r_c, tcs, hs = loops.ln_lstm_forward(
            gates.view(T, B, xw.shape[1]), h0, c0, pack(w_hh, B), _double_g(g_hh, doubled),
            g_c, b_c, doubled,
        )  # fmt: skip
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
            pack(s.w_hh.t().contiguous(), B), s.g_hh, s.g_c, s.b_c, dy, dh_n, dc_n,
        )  # fmt: skip
        ln_backward = torch.ops.aten.native_layer_norm_backward
        d2 = d_gates.view(T * B, G)
        d_xw, dg_ih, db = ln_backward(d2, s.xw, [G], s.m_ih, s.r_ih, s.g_ih, s.b, [True] * 3)
        # The step LayerNorms' affine gradients, for all steps in one fused pass each.
        hp, m_hh, r_hh = s.hp.view(T * B, G), s.m_hh.view(T * B, 1), s.r_hh.view(T * B, 1)
        dg_hh = ln_backward(d2, hp, [G], m_hh, r_hh, s.g_hh, None, [False, True, False])[1]
        d_c, cs, m_c, r_c = d_cout.view(T * B, H), s.cs.view(T * B, H), s.m_c, s.r_c
        _, dg_c, db_c = ln_backward(d_c, cs, [H], m_c, r_c, s.g_c, s.b_c, [False, True, True])
        h_prev = torch.cat([s.h0.unsqueeze(0), s.hs[:-1]]).view(T * B, H)  # (T*B, H)
        dx = input_grad(ctx.needs_input_grad[0], d_xw, s.w_ih, T, B)
        (dw_ih,), _ = linear_grads(d_xw, [s.x2])
        (dw_hh,), _ = linear_grads(d_hp.view(T * B, G), [h_prev])
        return dx, dh0, dc0, dw_ih, dw_hh, db, db, dg_ih, dg_hh, dg_c, db_c, None


class FusedGRULayer(torch.autograd.Function):
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
        loops: Any,  # compiled.Loops: the backend's time loops
    ) -> tuple[Tensor, Tensor]:
        T, B, _ = x.shape
        x2 = x.reshape(T * B, x.shape[2])  # (T*B, I)
        gates = mm_t(x2, w_ih).add_(b_ih).view(T, B, w_ih.shape[0])  # (T, B, 3H)
        gates, hn, hs = loops.gru_forward(gates, h0, pack(w_hh, B), b_hh)
        ctx.save_for_backward(x2, h0, w_ih, w_hh, gates, hn, hs)
        ctx.loops = loops
        return hs, hs[-1].clone()

    @staticmethod
    def backward(ctx: Any, dy: Tensor, dh_n: Tensor) -> tuple[Tensor | None, ...]:
        x2, h0, w_ih, w_hh, gates, hn, hs = ctx.saved_tensors
        T, B, G = gates.shape
        h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]])  # (T, B, H)
        w_hh_t = pack(w_hh.t().contiguous(), B)  # (H, 3H)
        d_x, d_h, dh0 = ctx.loops.gru_backward(gates, hn, h_prev, w_hh_t, dy, dh_n)
        dx2, dh2 = d_x.view(T * B, G), d_h.view(T * B, G)  # (T*B, 3H)
        dx = input_grad(ctx.needs_input_grad[0], dx2, w_ih, T, B)
        h2 = h_prev.view(T * B, h0.shape[1])
        (dw_ih,), db_ih = linear_grads(dx2, [x2])
        (dw_hh,), db_hh = linear_grads(dh2, [h2])
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None
