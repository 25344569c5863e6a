"""Scan cells: the blocked and scan forms against the step form (the reference), the cells against
their papers' formulas, resets, carried state, dtypes and edge shapes, and the residual block."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from seqtrain import evaluate, sample
from seqtrain.cells.blocks import ResidualBlock, residual_stack
from seqtrain.cells.scan import (
    RGLRU_C,
    SCAN_CELLS,
    ScanStack,
    linear_scan,
)
from seqtrain.memory import SavedBytes

from .conftest import assert_close, assert_exact_resume_in_process, run_in_process

CELLS = list(SCAN_CELLS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make(cell: str, dtype: torch.dtype, inp: int = 5, H: int = 4, L: int = 2) -> ScanStack:
    """Blocks of 3 steps: the blocked form crosses block boundaries (and ends on a short block)
    in every window longer than 3."""
    torch.manual_seed(0)
    return ScanStack(cell, inp, H, L, block=3).to(dtype)


def inputs(
    stack: ScanStack, B: int, T: int, dtype: torch.dtype, with_h0: bool, with_resets: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, stack.input_size, generator=g, dtype=dtype)
    shape = stack.state_shapes(B)[0]
    h0 = torch.randn(shape, generator=g, dtype=dtype) if with_h0 else None
    resets = None
    if with_resets:
        resets = torch.rand(B, T, generator=g) < 0.1
        resets[0, 0] = True  # a reset at the first step: the carried state gets no gradient
    return x, h0, resets


def run(
    stack: ScanStack, x: Tensor, h0: Tensor | None, resets: Tensor | None, form: str
) -> dict[str, Tensor]:
    """Outputs, final state and the gradients of a generic loss (random weights on y and h)."""
    stack.form = form
    x = x.clone().requires_grad_()
    state = None if h0 is None else (h0.clone().requires_grad_(),)
    y, (h,) = stack(x, state, resets)
    g = torch.Generator().manual_seed(2)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)).sum()
    names, params = zip(*stack.named_parameters(), strict=True)
    wrt = [x, *params] + ([state[0]] if state else [])
    grads = torch.autograd.grad(loss, wrt)
    out = {"y": y, "h": h, "grad x": grads[0]}
    out |= {f"grad {n}": d for n, d in zip(names, grads[1 : 1 + len(names)], strict=True)}
    if state:
        out["grad h0"] = grads[-1]
    return out


def compare(got: dict[str, Tensor], want: dict[str, Tensor], tol: float) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], key, tol, scaled=True)


# --- the scan against the step form -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("resets", [False, True], ids=["", "resets"])
@pytest.mark.parametrize("h0", [False, True], ids=["", "h0"])
@pytest.mark.parametrize("T", [1, 2, 7, 64])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("form", ["blocked", "scan"])
def test_scan_matches_step(
    form: str, cell: str, T: int, h0: bool, resets: bool, dtype: torch.dtype
) -> None:
    stack = make(cell, dtype)
    x, s, r = inputs(stack, 3, T, dtype, h0, resets)
    compare(run(stack, x, s, r, form), run(stack, x, s, r, "step"), TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("h0,resets", [(False, False), (True, True)], ids=["", "h0-resets"])
@pytest.mark.parametrize("cell", CELLS)
def test_scan_matches_step_long(cell: str, h0: bool, resets: bool, dtype: torch.dtype) -> None:
    """T = 4096: neither the chunked scan's regrouping nor the blocks drift from the step loop."""
    stack = make(cell, dtype, inp=3, H=3, L=1)
    stack.block = 64
    x, s, r = inputs(stack, 2, 4096, dtype, h0, resets)
    want = run(stack, x, s, r, "step")
    for form in ("blocked", "scan"):
        compare(run(stack, x, s, r, form), want, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
def test_scan_matches_step_on_every_device(cell: str, device: str) -> None:
    """float32, an initial state and resets, T spanning several chunks, on CPU and CUDA."""
    stack = make(cell, torch.float32).to(device)
    x, h0, resets = (
        None if t is None else t.to(device) for t in inputs(stack, 3, 50, torch.float32, True, True)
    )
    want = run(stack, x, h0, resets, "step")
    for form in ("blocked", "scan"):
        compare(run(stack, x, h0, resets, form), want, 1e-5)


@pytest.mark.parametrize("T", [1, 2, 5, 10])
def test_linear_scan_gradcheck(T: int) -> None:
    """Any signs, exact zeros (resets), every padding case; first and second derivatives."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, T, 3, generator=g, dtype=torch.float64)
    a[0, T // 2] = 0.0
    b = torch.randn(2, T, 3, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    args = tuple(t.requires_grad_() for t in (a, b, h0))
    assert torch.autograd.gradcheck(linear_scan, args)
    assert torch.autograd.gradgradcheck(linear_scan, args)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("form", ["blocked", "scan"])
def test_stack_gradcheck(form: str, cell: str) -> None:
    """Float64 gradcheck in x, h0 and every parameter, with a reset (blocked: across blocks)."""
    stack = make(cell, torch.float64, inp=3, H=2, L=2)
    stack.form = form
    x, h0, _ = inputs(stack, 2, 5, torch.float64, True, False)
    resets = torch.zeros(2, 5, dtype=torch.bool)
    resets[1, 2] = True
    names, params = zip(*stack.named_parameters(), strict=True)

    def f(x: Tensor, h0: Tensor, *ps: Tensor) -> tuple[Tensor, Tensor]:
        y, (h,) = functional_call(stack, dict(zip(names, ps, strict=True)), (x, (h0,), resets))
        return y, h

    args = (x.requires_grad_(), h0.requires_grad_(), *(p.detach().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, args)


# --- the cells are the papers' recurrences ------------------------------------------------------


def paper_step(layer: nn.Module, cell: str, x: Tensor, h: Tensor) -> Tensor:
    """One step written from the papers, directly from the parameters (float64)."""

    def g(v: Tensor) -> Tensor:
        return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))

    if cell == "mingru":
        k_z, k_h = (x @ layer.proj.weight.T + layer.proj.bias).chunk(2, -1)
        z = torch.sigmoid(k_z)
        return (1 - z) * h + z * g(k_h)
    if cell == "minlstm":
        k_f, k_i, k_h = (x @ layer.proj.weight.T + layer.proj.bias).chunk(3, -1)
        f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
        return f / (f + i) * h + i / (f + i) * g(k_h)
    u = x @ layer.proj_in.weight.T + layer.proj_in.bias
    k_r, k_i = (u @ layer.gates.weight.T + layer.gates.bias).chunk(2, -1)
    a = torch.sigmoid(layer.decay_logit) ** (RGLRU_C * torch.sigmoid(k_r))
    return a * h + torch.sqrt(1 - a**2) * (torch.sigmoid(k_i) * u)


@pytest.mark.parametrize("cell", CELLS)
def test_cells_are_the_papers_recurrences(cell: str) -> None:
    stack = make(cell, torch.float64, L=2)
    x, h0, _ = inputs(stack, 3, 9, torch.float64, True, False)
    y, (h,) = stack(x, (h0,))
    with torch.no_grad():
        layer_in = x
        for k, layer in enumerate(stack.layers):
            state, states = h0[k], []
            for t in range(x.shape[1]):
                state = paper_step(layer, cell, layer_in[:, t], state)
                states.append(state)
            layer_in = torch.stack(states, 1)
            assert_close(h[k], state, f"layer {k} final state", 1e-12, scaled=True)
    assert_close(y, layer_in, "y", 1e-12, scaled=True)


def identity_projected(cell: str, H: int, dtype: torch.dtype) -> ScanStack:
    """A one-layer stack whose pre-activations are its input (identity weights, no bias; the
    RG-LRU's u, k_r and k_i all equal x), so float32 and float64 coefficients are computed from
    the very same pre-activations."""
    n = {"mingru": 2, "minlstm": 3, "rglru": 1}[cell]
    stack = ScanStack(cell, n * H, H, 1).to(dtype)
    layer = stack.layers[0]
    with torch.no_grad():
        for lin in (layer.proj,) if cell != "rglru" else (layer.proj_in, layer.gates):
            lin.weight.copy_(
                torch.eye(lin.in_features).repeat(lin.out_features // lin.in_features, 1)
            )
            lin.bias.zero_()
        if cell == "rglru":
            layer.decay_logit.copy_(torch.linspace(-2.0, 16.0, H))  # a up to 1 - 1e-7
    return stack


@pytest.mark.parametrize("cell", CELLS)
def test_coefficients_accurate_when_gates_saturate(cell: str) -> None:
    """In float32, a_t and b_t keep float32's relative precision for saturated gates (1 - z -> 0,
    f and i both underflowing, a_t -> 1), where 1 - sigmoid(k), f / (f + i) and sqrt(1 - a^2)
    computed directly would return 0, 0 / 0 or lose every digit; and they are the papers'
    log-space values."""
    grid = torch.tensor([-120.0, -40.0, -17.0, -3.0, 0.5, 3.0, 17.0, 40.0])
    if cell == "rglru":  # H = 8 channels of different Lambda, every u against every channel
        H = 8
        x = torch.stack([grid.roll(j) for j in range(H)])[None]  # (1, 8, 8)
    else:  # H = 1, every combination of the pre-activations
        H = 1
        x = torch.cartesian_prod(*[grid] * (2 if cell == "mingru" else 3))[None]  # (1, T, n)
    a32, b32 = identity_projected(cell, H, torch.float32).layers[0].coefficients(x)
    layer64 = identity_projected(cell, H, torch.float64).layers[0]
    a64, b64 = layer64.coefficients(x.double())
    assert torch.isfinite(a32).all() and torch.isfinite(b32).all()
    normal = torch.finfo(torch.float32).tiny
    for name, got, want in (("a", a32, a64), ("b", b32, b64)):
        err = (got.double() - want).abs()
        representable = want.abs() >= normal
        rel = (err[representable] / want.abs()[representable]).max().item()
        assert rel < 1e-5, f"{cell} {name}: relative error {rel:.3g}"
        assert (err[~representable] <= normal).all(), f"{cell} {name} below float32's range"
    log_a, log_b = log_space_coefficients(layer64, cell, x.double())
    assert_close(a64.log(), log_a, "log a", 1e-12, scaled=True)
    assert_close(b64.abs().log(), log_b, "log |b|", 1e-12, scaled=True)


def log_space_coefficients(layer: nn.Module, cell: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """log a_t and log |b_t| as Feng et al. (log g, softplus) and Griffin (c r log a) write them."""

    def log_g(v: Tensor) -> Tensor:
        return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))

    if cell == "mingru":
        k_z, k_h = layer.proj(x).chunk(2, -1)
        return -F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h)
    if cell == "minlstm":
        k_f, k_i, k_h = layer.proj(x).chunk(3, -1)
        log_f, log_i = -F.softplus(-k_f), -F.softplus(-k_i)
        log_fi = torch.logaddexp(log_f, log_i)
        return log_f - log_fi, log_i - log_fi + log_g(k_h)
    u = layer.proj_in(x)
    k_r, k_i = layer.gates(u).chunk(2, -1)
    log_a = RGLRU_C * torch.sigmoid(k_r) * F.logsigmoid(layer.decay_logit)
    log_b = 0.5 * torch.log(-torch.expm1(2 * log_a)) + F.logsigmoid(k_i) + u.abs().log()
    return log_a, log_b


# --- resets, carried state ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["blocked", "scan", "step"])
@pytest.mark.parametrize("cell", CELLS)
def test_reset_drops_exactly_the_carried_state(cell: str, form: str) -> None:
    """Stream 0 reset at t = 4 continues as a fresh zero-state run from t = 4; stream 1 (no reset)
    is untouched; stream 2 reset at t = 0 ignores its h0. Nothing after a reset depends on what
    came before it."""
    stack = make(cell, torch.float64)
    stack.form = form
    x, h0, _ = inputs(stack, 3, 10, torch.float64, True, False)
    x.requires_grad_()
    h0.requires_grad_()
    resets = torch.zeros(3, 10, dtype=torch.bool)
    resets[0, 4] = resets[2, 0] = True
    y, (h,) = stack(x, (h0,), resets)
    plain, (h_plain,) = stack(x, (h0,))
    fresh, (h_fresh,) = stack(x[:1, 4:])
    assert_close(y[0, 4:], fresh[0], "stream 0 after its reset", 1e-12, scaled=True)
    assert_close(h[:, 0], h_fresh[:, 0], "stream 0 final state", 1e-12, scaled=True)
    assert_close(y[0, :4], plain[0, :4], "stream 0 before its reset", 1e-12, scaled=True)
    assert_close(y[1], plain[1], "stream 1", 1e-12, scaled=True)
    zero_h0, _ = stack(x[2:], (torch.zeros_like(h0[:, 2:]),))
    assert_close(y[2], zero_h0[0], "stream 2", 1e-12, scaled=True)
    gx, gh0 = torch.autograd.grad(y[0, 4:].sum() + y[2].sum(), (x, h0))
    assert (gx[0, :4] == 0).all() and (gh0[:, 0] == 0).all() and (gh0[:, 2] == 0).all()
    assert (gx[0, 4:] != 0).any()


@pytest.mark.parametrize("form", ["blocked", "scan", "step"])
@pytest.mark.parametrize("cell", CELLS)
def test_carry_equals_one_run(cell: str, form: str) -> None:
    """Windows of 3, 1 and 6 steps, the final state of each (attached) carried into the next, give
    the outputs and all gradients of one run over the 10 steps: TBPTT and sampling rely on it."""
    stack = make(cell, torch.float64)
    x, h0, resets = inputs(stack, 3, 10, torch.float64, True, True)
    want = run(stack, x, h0, resets, form)

    class Windows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = stack

        def forward(self, x: Tensor, state: tuple | None, resets: Tensor) -> tuple:
            ys = []
            for lo, hi in ((0, 3), (3, 4), (4, 10)):
                y, state = self.stack(x[:, lo:hi], state, resets[:, lo:hi])
                ys.append(y)
            return torch.cat(ys, 1), state

    windows = Windows()
    windows.input_size, windows.state_shapes = stack.input_size, stack.state_shapes
    compare(
        {k.replace("stack.", ""): v for k, v in run(windows, x, h0, resets, form).items()},
        want,
        1e-12,
    )


# --- dtypes, shapes, errors ----------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_autocast_stays_near_float32(cell: str) -> None:
    """Under bf16 autocast the projections run in bf16, the recurrence in float32: outputs within
    bf16 tolerance of the float32 run after 64 steps, gradients finite."""
    stack = make(cell, torch.float32)
    x, h0, resets = inputs(stack, 3, 64, torch.float32, True, True)
    want, _ = stack(x, (h0,), resets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h,) = stack(x.requires_grad_(), (h0,), resets)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close(y, want, "bf16 y", 3e-2, scaled=True)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in stack.parameters())


@pytest.mark.parametrize("form", ["blocked", "scan", "step"])
@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch(cell: str, form: str) -> None:
    stack = make(cell, torch.float32)
    stack.form = form
    x = torch.randn(0, 6, 5, requires_grad=True)
    y, (h,) = stack(x)
    assert y.shape == (0, 6, 4) and h.shape == (2, 0, 4)
    y.sum().backward()
    assert all((p.grad == 0).all() for p in stack.parameters())


def test_bad_inputs_are_clear_errors() -> None:
    stack = make("mingru", torch.float32)
    with pytest.raises(ValueError, match="T=0"):
        stack(torch.randn(2, 0, 5))
    with pytest.raises(ValueError, match=r"\(B, T, I\)"):
        stack(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"num_layers, B, H\) = \(2, 2, 4\)"):
        stack(torch.randn(2, 3, 5), (torch.zeros(2, 3, 4),))
    with pytest.raises(ValueError, match="resets must be"):
        stack(torch.randn(2, 3, 5), None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mingru, minlstm, rglru"):
        ScanStack("gru", 5, 4)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("form", ["blocked", "scan"])
def test_activation_elements_per_step_is_what_autograd_keeps(form: str, cell: str) -> None:
    """The planner's per-step number, against saved-tensor hooks: the difference between a 64-
    and a 36-step window (both square, so no padding) is exactly 28 steps' worth."""
    stack = make(cell, torch.float32)
    stack.form = form
    saved = {}
    for T in (36, 64):
        x = torch.randn(3, T, 5)
        with SavedBytes(exclude=[x, *stack.parameters()]) as counter:
            stack(x)
        saved[T] = counter.bytes
    per_step = 4 * stack.activation_elements_per_step(3)
    assert (saved[64] - saved[36]) == 28 * per_step
    assert stack.state_shapes(3) == ((2, 3, 4),)


# --- residual blocks -----------------------------------------------------------------------------


CORES = {
    **{cell: (lambda c=cell: ScanStack(c, 6, 6, 1)) for cell in CELLS},
    "nn.LSTM": lambda: nn.LSTM(6, 6, batch_first=True),
}


@pytest.mark.parametrize("core", list(CORES))
def test_residual_stack_keeps_the_contract(core: str) -> None:
    """Shapes and state layout kept, gradients reach x and every parameter, and the state carried
    across two windows gives the one-window result: for scan cells and nn.LSTM alike."""
    torch.manual_seed(0)
    model = residual_stack(CORES[core], 6, width=6, num_layers=2).double()
    assert isinstance(model.blocks[0], ResidualBlock)
    x = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True)
    y, state = model(x)
    assert y.shape == x.shape
    assert all(s.shape == (2, 3, 6) for s in state) and len(state) == (
        2 if core == "nn.LSTM" else 1
    )
    y1, s1 = model(x[:, :5])
    y2, s2 = model(x[:, 5:], s1)
    assert_close(torch.cat([y1, y2], 1), y, "carried y", 1e-12, scaled=True)
    for got, want in zip(s2, state, strict=True):
        assert_close(got, want, "carried state", 1e-12, scaled=True)
    y.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_residual_block_passes_resets_to_scan_cores() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(ScanStack("minlstm", 6, 6, 1), 6).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    resets = torch.zeros(2, 7, dtype=torch.bool)
    resets[0, 3] = True
    y, _ = block(x, None, resets)
    fresh, _ = block(x[:1, 3:])
    assert_close(y[0, 3:], fresh[0], "reset inside the block", 1e-12, scaled=True)


# ---------------------------------------------------------------------------------------------
# Under seqtrain: the registry, the engine's resets, the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_scan_cells_are_registered_for_modular_and_compile(cell: str) -> None:
    from seqtrain import cells

    rnn = cells.build_recurrent("modular", cell, 5, 6, 2)
    assert isinstance(rnn, ScanStack) and rnn.num_states == 1 and rnn.output_size == 6
    assert cells.kernel_name(rnn, torch.device("cpu")).startswith(
        "linear recurrence (blocked form)"
    )
    for backend in ("cudnn", "jit"):
        with pytest.raises(ValueError, match="backends that run it: modular, compile"):
            cells.check_options(backend, cell, 1)
    with pytest.raises(ValueError, match="model.zoneout=0.1 is not supported"):
        cells.check_options("modular", cell, 1, zoneout=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_compile_computes_the_modular_scan_and_copies(cell: str) -> None:
    """compile fuses each layer's coefficients; outputs and gradients are eager's, and the module
    deep-copies and pickles (the compiled graphs live outside it)."""
    import copy
    import pickle

    from seqtrain import cells

    torch.manual_seed(0)
    eager = cells.build_recurrent("modular", cell, 5, 6, 2)
    compiled = cells.build_recurrent("compile", cell, 5, 6, 2)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(3, 9, 5, requires_grad=True)
    resets = torch.zeros(3, 9, dtype=torch.bool)
    resets[1, 4] = True
    outs = []
    for rnn in (eager, compiled):
        y, (h,) = rnn(x, None, resets)
        grads = torch.autograd.grad(y.sum() + h.sum(), [x, *rnn.parameters()])
        outs.append((y, h, grads))
    assert_close(outs[1][0], outs[0][0], "compiled y", 1e-5, scaled=True)
    assert_close(outs[1][1], outs[0][1], "compiled h", 1e-5, scaled=True)
    for got, want in zip(outs[1][2], outs[0][2], strict=True):
        assert_close(got, want, "compiled gradient", 1e-5, scaled=True)
    for twin in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        assert_close(twin(x, None, resets)[0], outs[1][0], "copy", 0.0, scaled=True)


def test_compile_fuses_the_residual_blocks_work_and_computes_the_same(caplog) -> None:
    """model.backend=compile in residual blocks: the norms, the MLP and the adds run compiled
    (no eager fallback), with the modular blocks' outputs and gradients."""
    import logging

    from seqtrain import cells

    torch.manual_seed(0)
    eager = cells.build_residual("modular", "mingru", 5, 6, 2)
    compiled = cells.build_residual("compile", "mingru", 5, 6, 2)
    compiled.load_state_dict(eager.state_dict())
    assert all(b.fused for b in compiled.blocks) and not any(b.fused for b in eager.blocks)
    x = torch.randn(3, 9, 5, requires_grad=True)
    with caplog.at_level(logging.INFO, "seqtrain.cells"):
        outs = [
            torch.autograd.grad(m(x)[0].square().sum(), [x, *m.parameters()])
            for m in (eager, compiled)
        ]
    assert "residual block's adds, norm and MLP ready" in caplog.text
    assert "residual block's input norm ready" in caplog.text and "failed" not in caplog.text
    for got, want in zip(outs[1], outs[0], strict=True):
        assert_close(got, want, "compiled residual gradient", 1e-5, scaled=True)


@pytest.mark.parametrize(
    ("backend", "cell"), [("cudnn", "lstm"), ("modular", "gru"), ("modular", "mingru")]
)
def test_residual_blocks_around_any_registered_cell(backend: str, cell: str) -> None:
    """model.block=residual: the blocks keep the stack contract the engine and the memory
    planner read, whatever the core, and take the width from an input of another size."""
    from seqtrain import cells

    torch.manual_seed(0)
    rnn = cells.build_residual(backend, cell, 5, 6, 3, dropout=0.1)
    x = torch.randn(2, 7, 5)
    y, state = rnn(x)
    assert y.shape == (2, 7, 6) and [tuple(s.shape) for s in state] == rnn.state_shapes(2)
    assert rnn.num_states == (2 if cell == "lstm" else 1) and rnn.output_size == 6
    assert rnn.resets_inside == (cell == "mingru")
    assert rnn.activation_elements_per_step(2) > 0
    assert cells.kernel_name(rnn, torch.device("cpu")).startswith("residual blocks around")
    y2, _ = rnn(x, state)
    y2.sum().backward()
    assert all(p.grad is not None for p in rnn.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_engine_passes_resets_into_the_scan_instead_of_cutting(cell: str, monkeypatch) -> None:
    """A window with document starts: resets inside the scan (one segment) give the loss and
    gradients of the engine's segment cuts with the state masked between them."""
    from seqtrain.data import DataSpec
    from seqtrain.model import ModelConfig, RecurrentModel
    from seqtrain.tasks import LanguageModelling, build_model
    from seqtrain.tbptt import Engine

    torch.manual_seed(0)
    task = LanguageModelling(DataSpec("tokens", 16, 16))
    model = build_model(
        ModelConfig(backend="modular", cell=cell, embedding_size=4, hidden_size=6, num_layers=2),
        task,
    ).double()
    x = torch.randint(0, 16, (3, 12))
    y = torch.randint(0, 16, (3, 12))
    resets = torch.zeros(3, 12, dtype=torch.bool)
    resets[0, 4] = resets[2, 7] = resets[1, 0] = True
    state = (torch.randn(2, 3, 6, dtype=torch.float64),)

    def run(inside: bool) -> tuple[Tensor, list[Tensor]]:
        monkeypatch.setattr(RecurrentModel, "resets_inside", property(lambda self: inside))
        model.zero_grad()
        loss, final, _, _ = Engine(model, task, 12).run(x, y, resets, state)
        (loss + final[0].sum()).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    original = RecurrentModel.layer_outputs  # what the engine runs a segment through
    monkeypatch.setattr(
        RecurrentModel, "layer_outputs", lambda self, *a: calls.append(a[-1]) or original(self, *a)
    )
    loss_in, grads_in = run(True)
    assert len(calls) == 1 and calls[0] is not None, "one segment, resets handed to the stack"
    calls.clear()
    loss_cut, grads_cut = run(False)
    assert len(calls) == 3 and all(r is None for r in calls), "cut at steps 0, 4 and 7"
    assert torch.allclose(loss_in, loss_cut, atol=1e-10, rtol=0)
    for a, b in zip(grads_in, grads_cut, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_scan_cells_in_residual_blocks_resume_exactly(tmp_path) -> None:
    """Stopped by SIGTERM and resumed: every step's loss equals the uninterrupted run's."""
    args = ["+debug=tiny", "trainer.max_steps=30", "trainer.val_check_interval=15"]
    args += ["trainer.sample_length=0", "model.cell=minlstm", "model.backend=modular"]
    args += ["model.block=residual", "model.num_layers=2", "model.dropout=0.1"]
    runs = assert_exact_resume_in_process(tmp_path, args)
    assert runs["resumed"]["val_bpc"] == runs["reference"]["val_bpc"]


def test_a_scan_cell_trains_evaluates_and_samples(tmp_path, caplog, capsys) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="seqtrain"):
        summary = run_in_process(run, "+debug=tiny", "model.cell=mingru", "model.backend=modular")
    assert "linear recurrence (blocked form)" in caplog.text  # the startup line names the kernel
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    evaluate.main([ckpt, "split=val"])
    assert json.loads(capsys.readouterr().out)["bpc"] == pytest.approx(summary["val_bpc"], abs=1e-4)
    sample.main([ckpt, "length=20", "prompt=def "])
    assert capsys.readouterr().out.startswith("def ")
