"""Matrix-state cells (gdn, mlstm): the chunk and quadratic forms against the step form (the
specification), resets, carried state, the engine (TBPTT, resets inside, chunk checkpoints), the
memory estimate, the config keys and a tiny training run that resumes, evaluates and samples."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor

from seqtrain import cells
from seqtrain.cells.matrix import MatrixStack
from seqtrain.memory import SavedBytes

CELLS = ["gdn", "mlstm"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def assert_near(got: Tensor, want: Tensor, tol: float, what: str) -> None:
    """|got - want| <= tol * max(1, max |want|), reporting the max difference."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    assert diff <= tol * scale, f"{what}: max diff {diff:.3g} > {tol:g} x {scale:.3g}"


def make(
    cell: str, dtype: torch.dtype, inp: int = 5, H: int = 8, L: int = 2, heads: int = 2
) -> MatrixStack:
    torch.manual_seed(0)
    return cells.build_recurrent("modular", cell, inp, H, L, num_heads=heads).to(dtype)


def inputs(
    stack: MatrixStack, B: int, T: int, dtype: torch.dtype, with_state: bool, with_resets: bool
) -> tuple[Tensor, tuple[Tensor, ...] | None, Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, stack.input_size, generator=g, dtype=dtype)
    state = None
    if with_state:  # any values: mLSTM's m of either sign, a nonzero convolution tail
        state = tuple(0.5 * torch.randn(s, generator=g, dtype=dtype) for s in stack.state_shapes(B))
    resets = None
    if with_resets:
        resets = torch.rand(B, T, generator=g) < 0.1
        resets[0, 0] = True  # a reset at the first step: the carried state gets no gradient
    return x, state, resets


def run(
    stack: MatrixStack,
    x: Tensor,
    state: tuple[Tensor, ...] | None,
    resets: Tensor | None,
    form: str,
    chunk: int = 64,
) -> list[Tensor]:
    """Outputs, final state and the gradients (input, parameters, initial state) of a loss with
    random weights on every output and final state tensor."""
    stack.form, stack.chunk = form, chunk
    x = x.clone().requires_grad_()
    state = None if state is None else tuple(s.clone().requires_grad_() for s in state)
    y, final = stack(x, state, resets)
    g = torch.Generator().manual_seed(2)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (y, *final))
    wrt = [x, *stack.parameters(), *(state or ())]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if d is None else d for d, w in zip(grads, wrt, strict=True)]
    return [y.detach(), *(f.detach() for f in final), *grads]


def assert_forms_agree(got: list[Tensor], want: list[Tensor], tol: float, what: str) -> None:
    names = ["y", "state..."] + ["grad"] * len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_near(a, b, tol, f"{what}: {names[min(k, 2)]} #{k}")


# (T, chunk): one step, shorter than a chunk, exact multiples, ragged ends, chunk 1 and 128
SHAPES = [(1, 1), (1, 64), (2, 1), (7, 3), (16, 4), (37, 5), (37, 64), (130, 16), (130, 128)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T, chunk", SHAPES)
@pytest.mark.parametrize("with_state, with_resets", [(False, False), (True, False), (True, True)])
def test_chunk_form_equals_the_step_form(
    cell: str, dtype: torch.dtype, T: int, chunk: int, with_state: bool, with_resets: bool
) -> None:
    """Outputs, final states and every gradient, the initial state's included."""
    stack = make(cell, dtype)
    x, state, resets = inputs(stack, 3, T, dtype, with_state, with_resets)
    want = run(stack, x, state, resets, "step")
    got = run(stack, x, state, resets, "chunk", chunk)
    assert_forms_agree(got, want, TOL[dtype], f"{cell} T={T} chunk={chunk}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quadratic_form_equals_the_step_form(cell: str, dtype: torch.dtype) -> None:
    stack = make(cell, dtype)
    x, state, resets = inputs(stack, 3, 40, dtype, True, True)
    want = run(stack, x, state, resets, "step")
    assert_forms_agree(run(stack, x, state, resets, "quadratic"), want, TOL[dtype], cell)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forms_agree_over_2048_steps(cell: str, dtype: torch.dtype) -> None:
    """A long window (small sizes keep it fast): chunk 1 and 128 against the step form."""
    stack = make(cell, dtype, inp=3, H=4, L=1, heads=1)
    x, state, resets = inputs(stack, 1, 2048, dtype, True, True)
    want = run(stack, x, state, resets, "step")
    for chunk in (1, 128):
        got = run(stack, x, state, resets, "chunk", chunk)
        assert_forms_agree(got, want, TOL[dtype], f"{cell} T=2048 chunk={chunk}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("form", ["chunk", "step"])
def test_reset_drops_exactly_the_carried_state(cell: str, form: str) -> None:
    """After a reset at step 5 a stream continues as a fresh run from there; other streams
    do not notice."""
    stack = make(cell, torch.float64)
    stack.form, stack.chunk = form, 4
    x, state, _ = inputs(stack, 2, 11, torch.float64, True, False)
    resets = torch.zeros(2, 11, dtype=torch.bool)
    resets[0, 5] = True
    y, final = stack(x, state, resets)
    fresh, fresh_final = stack(x[:1, 5:])
    assert_near(y[0, 5:], fresh[0], 1e-12, "after the reset")
    for got, want in zip(final, fresh_final, strict=True):
        assert_near(got[:, :1], want, 1e-12, "final state after the reset")
    whole, _ = stack(x[1:], tuple(s[:, 1:] for s in state))
    assert_near(y[1], whole[0], 1e-12, "the other stream")


@pytest.mark.parametrize("cell", CELLS)
def test_compile_backend_computes_the_modular_chunk_form(cell: str, caplog) -> None:
    """model.backend=compile runs each chunk through torch.compile (one chunk shape, with resets,
    to keep the compiling short): outputs, final states and gradients are modular's; it
    deep-copies and pickles (the graphs live outside the module)."""
    import logging

    torch.manual_seed(0)
    modular = cells.build_recurrent("modular", cell, 5, 8, 1, num_heads=2)
    compiled = cells.build_recurrent("compile", cell, 5, 8, 1, num_heads=2)
    compiled.load_state_dict(modular.state_dict())
    x, state, resets = inputs(modular, 3, 16, torch.float32, True, True)
    with caplog.at_level(logging.INFO, "seqtrain.cells"):
        got = run(compiled, x, state, resets, "chunk", 8)
    assert f"torch.compile: {cell} chunk ready" in caplog.text and "failed" not in caplog.text
    assert_forms_agree(got, run(modular, x, state, resets, "chunk", 8), 1e-5, "compile")
    assert "torch.compile'd chunks" in cells.kernel_name(compiled, torch.device("cpu"))
    for twin in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        assert_forms_agree(run(twin, x, state, resets, "chunk", 8), got, 0.0, "copy")


@pytest.mark.parametrize("cell", CELLS)
def test_carry_across_windows_equals_one_long_run(cell: str) -> None:
    stack = make(cell, torch.float64)
    stack.chunk = 4
    x, state, resets = inputs(stack, 3, 23, torch.float64, True, True)
    y, final = stack(x, state, resets)
    parts, s = [], state
    for a, b in ((0, 6), (6, 7), (7, 23)):
        out, s = stack(x[:, a:b], s, resets[:, a:b])
        parts.append(out)
    assert_near(torch.cat(parts, 1), y, 1e-12, "carried y")
    for got, want in zip(s, final, strict=True):
        assert_near(got, want, 1e-12, "carried state")


@pytest.mark.parametrize("cell", CELLS)
def test_state_layout_and_bad_inputs(cell: str) -> None:
    stack = make(cell, torch.float32)
    d = 4  # H = 8, two heads
    want = {
        "gdn": [(2, 3, 2, d, d), (2, 3, 3, 24)],  # S; the convolution's last 3 inputs of q, k, v
        "mlstm": [(2, 3, 2, d, d), (2, 3, 2, d), (2, 3, 2)],  # C, n, m
    }[cell]
    assert [tuple(s) for s in stack.state_shapes(3)] == want
    y, state = stack(torch.randn(3, 5, 5))
    assert y.shape == (3, 5, 8) and [tuple(s.shape) for s in state] == want
    assert stack.num_states == len(want) and stack.resets_inside and stack.output_size == 8
    assert cells.kernel_name(stack, torch.device("cpu")).startswith(f"{cell}, chunk form")
    x = torch.randn(3, 5, 5)
    assert torch.equal(pickle.loads(pickle.dumps(copy.deepcopy(stack)))(x)[0], stack(x)[0])
    with pytest.raises(ValueError, match="T=0"):
        stack(torch.randn(2, 0, 5))
    with pytest.raises(ValueError, match=r"state\[0\] must be \(num_layers, B, \.\.\.\)"):
        stack(torch.randn(2, 3, 5), tuple(torch.zeros(s) for s in stack.state_shapes(3)))
    with pytest.raises(ValueError, match="resets must be"):
        stack(torch.randn(2, 3, 5), None, torch.zeros(2, 3))


def test_reset_masks_states_of_any_rank() -> None:
    """The engine's reset between segments zeroes a stream's matrix state too."""
    from seqtrain.tbptt import reset

    state = (torch.ones(2, 3, 2, 4, 4), torch.ones(2, 3, 5))
    keep = torch.tensor([True, False, True])
    out = reset(state, keep)
    for s in out:
        assert (s[:, 1] == 0).all() and (s[:, [0, 2]] == 1).all()


def _lm(cell: str):
    from seqtrain.data import DataSpec
    from seqtrain.model import ModelConfig
    from seqtrain.tasks import LanguageModelling, build_model

    torch.manual_seed(0)
    task = LanguageModelling(DataSpec("tokens", 16, 16))
    cfg = ModelConfig(
        backend="modular", cell=cell, embedding_size=4, hidden_size=6, num_layers=2, num_heads=2
    )
    model = build_model(cfg, task).double()
    model.rnn.chunk = 4
    return model, task


@pytest.mark.parametrize("cell", CELLS)
def test_engine_resets_inside_equal_the_engine_cuts(cell: str, monkeypatch) -> None:
    """A window with document starts: the stack's own resets give the loss and gradients of the
    engine cutting the window there and masking the state (tbptt.reset) between segments."""
    from seqtrain.model import RecurrentModel
    from seqtrain.tbptt import Engine

    model, task = _lm(cell)
    x, y = torch.randint(0, 16, (3, 12)), torch.randint(0, 16, (3, 12))
    resets = torch.zeros(3, 12, dtype=torch.bool)
    resets[0, 4] = resets[2, 7] = resets[1, 0] = True
    g = torch.Generator().manual_seed(3)
    state = tuple(
        torch.randn(s, generator=g, dtype=torch.float64) for s in model.rnn.state_shapes(3)
    )

    def grads(inside: bool) -> tuple[Tensor, list[Tensor]]:
        monkeypatch.setattr(RecurrentModel, "resets_inside", property(lambda self: inside))
        model.zero_grad()
        loss, final, _, _ = Engine(model, task, 12).run(x, y, resets, state)
        (loss + sum(f.sum() for f in final)).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_in, grads_in = grads(True)
    loss_cut, grads_cut = grads(False)
    assert torch.allclose(loss_in, loss_cut, atol=1e-10, rtol=0)
    for a, b in zip(grads_in, grads_cut, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_tbptt_and_chunk_checkpoints_give_the_same_gradients(cell: str) -> None:
    """TBPTT(k1=6, k2=10) over two windows, with and without chunk checkpointing: the same
    losses, gradients and carried state (float64)."""
    from seqtrain.data import Window
    from seqtrain.tbptt import Engine

    results = []
    for chunk in (None, 3):
        model, task = _lm(cell)
        engine = Engine(model, task, window=10, stride=6, chunk=chunk)
        g = torch.Generator().manual_seed(4)
        losses, grads = [], []
        for index in range(2):
            x = torch.randint(0, 16, (2, 6), generator=g)
            resets = torch.rand(2, 6, generator=g) < 0.2
            window = Window(x, torch.randint(0, 16, (2, 6), generator=g), resets, index)
            model.zero_grad()
            losses.append(engine.train_update(window, lambda loss: loss.backward()).loss)
            grads.append([p.grad.clone() for p in model.parameters()])
        results.append((losses, grads, engine.state))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-12)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        for a, b in zip(ga, gb, strict=True):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)
    for a, b in zip(state_a, state_b, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("H, heads, chunk", [(64, 4, 16), (64, 4, 64), (128, 8, 32), (32, 2, 64)])
def test_activation_elements_per_step_estimates_what_autograd_keeps(
    cell: str, H: int, heads: int, chunk: int
) -> None:
    """The planner's per-step number against saved-tensor hooks: the difference between a 4- and
    a 2-chunk window, within 30% (the probe corrects the rest)."""
    torch.manual_seed(0)
    stack = cells.build_recurrent("modular", cell, 8, H, 1, num_heads=heads)
    stack.chunk = chunk
    saved = {}
    for T in (2 * chunk, 4 * chunk):
        x = torch.randn(2, T, 8)
        with SavedBytes(exclude=[x, *stack.parameters()]) as counter:
            stack(x)
        saved[T] = counter.bytes
    measured = (saved[4 * chunk] - saved[2 * chunk]) / (2 * chunk) / 4  # float32 elements
    estimate = stack.activation_elements_per_step(2)
    assert 0.7 * measured <= estimate <= 1.3 * measured, (estimate, measured)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_autocast_keeps_the_recurrence_in_float32(cell: str) -> None:
    stack = make(cell, torch.float32)
    x, state, resets = inputs(stack, 2, 9, torch.float32, True, True)
    want, want_state = stack(x, state, resets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, final = stack(x, state, resets)
    assert all(s.dtype == torch.float32 for s in final)
    assert (y.float() - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("cell", CELLS)
def test_residual_blocks_carry_matrix_states(cell: str) -> None:
    torch.manual_seed(0)
    model = cells.build_residual("modular", cell, 5, 8, 2, num_heads=2).double()
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    resets = torch.zeros(2, 9, dtype=torch.bool)
    resets[1, 3] = True
    y, state = model(x, None, resets)
    assert [tuple(s.shape) for s in state] == [tuple(s) for s in model.state_shapes(2)]
    y1, s1 = model(x[:, :4], None, resets[:, :4])
    y2, _ = model(x[:, 4:], s1, resets[:, 4:])
    assert_near(torch.cat([y1, y2], 1), y, 1e-12, "carried through residual blocks")


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_heads=2"], "model.num_heads=2 is not supported by cell 'lstm'"),
        (
            ["model.cell=mlstm", "model.backend=modular", "model.conv_size=2"],
            "model.conv_size=2 is not supported by cell 'mlstm'; cells that support it: gdn",
        ),
        (
            ["model.cell=gdn", "model.backend=modular", "model.num_heads=3"],
            "model.num_heads=3: must be at least 1 and divide model.hidden_size=16",
        ),
        (
            ["model.cell=gdn", "model.backend=modular", "model.conv_size=0"],
            "model.conv_size=0: must be at least 1",
        ),
        (["model.cell=gdn", "model.backend=cudnn"], "does not run model.cell=gdn"),
    ],
)
def test_bad_matrix_cell_config_is_one_line(overrides: list[str], message: str) -> None:
    from seqtrain.config import validate
    from seqtrain.errors import ConfigError

    from .conftest import composed

    with pytest.raises(ConfigError, match=message) as err:
        validate(composed("+debug=tiny", *overrides))
    assert "\n" not in str(err.value)


# --- a tiny training run -------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_a_matrix_cell_trains_resumes_exactly_evaluates_and_samples(
    cell: str, tmp_path, monkeypatch, capsys
) -> None:
    """+debug=tiny with the cell: stopped by SIGUSR1 after update 3 and resumed, every step's
    loss equals the uninterrupted run's; evaluate and sample read its checkpoint."""
    import os
    import signal

    from seqtrain import evaluate, sample, train

    from .conftest import read_scalars, refusal
    from .test_reliability import on_updates, tiny_job

    args = [f"model.cell={cell}", "model.backend=modular", "model.num_heads=2"]
    reference = train.fit(tiny_job(tmp_path / "reference", *args))
    assert reference["steps"] == 6 and reference["val_bpc"] < 8.5

    sent = []

    def signal_once(out):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    with monkeypatch.context() as patch:
        on_updates(patch, {3}, signal_once)
        stopped = train.fit(tiny_job(tmp_path / "stopped", *args))
    assert stopped["steps"] == 3
    resumed = train.fit(tiny_job(tmp_path / "stopped", *args, "resume=auto"))
    assert resumed["resumed_from"] and resumed["val_bpc"] == reference["val_bpc"]
    expected = read_scalars(tmp_path / "reference", "train/loss")
    assert read_scalars(tmp_path / "stopped", "train/loss") == expected and len(expected) == 6

    ckpt = str(tmp_path / "reference" / "checkpoints" / "last.ckpt")
    figures = evaluate.evaluate(evaluate.EvaluateArgs(ckpt=ckpt, split="val"), {})
    assert figures["bpc"] == pytest.approx(reference["val_bpc"], abs=1e-4)
    text = sample.sample(sample.SampleArgs(ckpt=ckpt, prompt="def ", length=10), {})
    assert text.startswith("def ") and len(text) > 4
    if cell == "gdn":  # the same weights under fla: one line off CUDA, before any reading
        line = refusal(evaluate.main, [f"ckpt={ckpt}", "model.backend=fla"], capsys=capsys)
        assert "model.backend=fla runs model.cell=gdn on cuda only" in line


# --- peers: flash-linear-attention's and mlstm-kernels' pure-PyTorch references -----------------


def _peer_inputs(d: int = 8, T: int = 37) -> dict[str, Tensor]:
    """Raw recurrence inputs (B, N, T, ...) in float32, as the layers make them."""
    g = torch.Generator().manual_seed(6)
    B, N = 2, 3
    q, k, v = (torch.randn(B, N, T, d, generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    q = torch.nn.functional.normalize(q, dim=-1) * d**-0.5
    gates = torch.randn(B, N, T, generator=g), torch.randn(B, N, T, generator=g)
    S = 0.5 * torch.randn(B, N, d, d, generator=g)
    n, m = 0.5 * torch.randn(B, N, d, generator=g), torch.randn(B, N, generator=g)
    return {"q": q, "k": k, "v": v, "a": gates[0], "b": gates[1], "S": S, "n": n, "m": m}


def _with_grads(fn, inputs: list[Tensor]) -> list[Tensor]:
    """fn's outputs and the gradients of a random-weighted sum of them w.r.t. `inputs`."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("form", ["step", "chunk"])
def test_gdn_equals_fla_naive_recurrent_gated_delta_rule(form: str) -> None:
    """Outputs, final state and gradients (initial state included) against fla's reference."""
    pytest.importorskip("triton", reason="fla's ops import triton (pip install -e '.[fla]')")
    naive = pytest.importorskip(
        "fla.ops.gated_delta_rule.naive", reason="pip install -e '.[fla]' adds fla"
    )
    from seqtrain.cells.gdn import delta_rule_chunkwise, delta_rule_step

    x = _peer_inputs()
    beta, log_decay = torch.sigmoid(x["a"]), -torch.nn.functional.softplus(x["b"])

    def ours(q, k, v, beta, g, S):
        if form == "chunk":
            return delta_rule_chunkwise(q, k, v, beta, g, S, None, 16)
        out = []
        for t in range(q.shape[2]):
            o, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[..., t], g[..., t], S)
            out.append(o)
        return torch.stack(out, 2), S

    def theirs(q, k, v, beta, g, S):  # fla's layout is (B, T, N, ...); q already scaled
        o, S = naive.naive_recurrent_gated_delta_rule(
            *(t.transpose(1, 2) for t in (q, k, v, beta, g)), 1.0, S, True
        )
        return o.transpose(1, 2), S

    args = [x["q"], x["k"], x["v"], beta, log_decay, x["S"]]
    for got, want in zip(_with_grads(ours, args), _with_grads(theirs, args), strict=True):
        assert_near(got, want, 1e-5, f"gdn {form} vs fla")


@pytest.mark.parametrize("form", ["step", "chunk"])
def test_mlstm_equals_mlstm_kernels_native_backends(form: str) -> None:
    """Outputs and final state (C, n, m) against mlstm-kernels' native recurrent and chunkwise
    PyTorch backends, from a carried initial state; gradients against the chunkwise one."""
    recurrent = pytest.importorskip(
        "mlstm_kernels.torch.recurrent.native_sequence", reason="pip install -e '.[fla]'"
    )
    chunkwise = pytest.importorskip("mlstm_kernels.torch.chunkwise.native.fwbw")
    from seqtrain.cells.mlstm import mlstm_chunkwise, mlstm_step

    x = _peer_inputs(d=8, T=32)  # mlstm-kernels' chunkwise form needs T a multiple of its chunk
    d = x["q"].shape[-1]

    def ours(q, k, v, i, f, C, n, m):  # q unscaled, f the pre-activation, as theirs
        q, log_f = q * d**-0.5, torch.nn.functional.logsigmoid(f)
        if form == "chunk":
            h, state = mlstm_chunkwise(q, k, v, i, log_f, (C, n, m), None, 16)
            return h, *state
        out, state = [], (C, n, m)
        for t in range(q.shape[2]):
            h, state = mlstm_step(
                q[:, :, t], k[:, :, t], v[:, :, t], i[..., t], log_f[..., t], state
            )
            out.append(h)
        return torch.stack(out, 2), *state

    def theirs_recurrent(q, k, v, i, f, C, n, m):
        h, (C, n, m) = recurrent.mlstm_recurrent_sequence__native_fw(
            q, k, v, i, f, C, n, m[..., None], return_last_states=True
        )
        return h, C, n, m[..., 0]

    def theirs_chunkwise(q, k, v, i, f, C, n, m):
        h, (C, n, m) = chunkwise.mlstm_chunkwise__native_autograd(
            q, k, v, i, f, C, n, m[..., None], return_last_states=True, chunk_size=16
        )
        return h, C, n, m.reshape(m.shape[:2])

    args = [x["q"], x["k"], x["v"], x["a"], x["b"] + 3.0, x["S"], x["n"], x["m"]]
    got = _with_grads(ours, args)
    with torch.no_grad():
        want = theirs_recurrent(*args)
    for a, b in zip(got[:4], want, strict=True):
        assert_near(a, b, 1e-5, f"mlstm {form} vs mlstm-kernels' recurrent")
    for a, b in zip(got, _with_grads(theirs_chunkwise, args), strict=True):
        assert_near(a, b, 1e-5, f"mlstm {form} vs mlstm-kernels' chunkwise")
