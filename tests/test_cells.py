"""Every backend computes nn.LSTM / nn.GRU exactly, shares its parameter layout, and each option
does what its name says. Tiny sizes: the whole file runs in well under a minute on two CPU cores."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells import build_recurrent, check_options, compiled, kernel_name
from seqtrain.cells import reference as ref_cells
from seqtrain.cells.base import implementations

from .conftest import assert_close, backend_flags

# The cells with nn.LSTM / nn.GRU's layout, tested against them (scan cells: test_scan.py), and
# every backend that runs them (not fla: it runs gdn only).
CELLS = ("lstm", "gru")
BACKENDS = tuple(implementations("lstm"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IN, H, B, T = 5, 7, 3, 6  # input, hidden, batch, time: small enough for every loop to be quick


@pytest.fixture(autouse=True)
def exact_cuda_matmuls() -> Iterator[None]:
    """TF32 would put 1e-3 differences between backends on a GPU; compare in true float32."""
    with backend_flags(
        (torch.backends.cuda.matmul, "allow_tf32", False),
        (torch.backends.cudnn, "allow_tf32", False),
    ):
        yield


def reference(cell: str, num_layers: int, **kwargs: int) -> nn.Module:
    rnn = nn.LSTM if cell == "lstm" else nn.GRU
    return rnn(IN, H, num_layers, batch_first=True, **kwargs)


def random_state(cell: str, num_layers: int, h_out: int = H, device: str = "cpu") -> tuple:
    h = torch.randn(num_layers, B, h_out, device=device)
    return (h, torch.randn(num_layers, B, H, device=device)) if cell == "lstm" else (h,)


def as_tuple(state: Tensor | tuple) -> tuple:
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "no-onednn"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_outputs_states_and_gradients(
    backend: str, cell: str, num_layers: int, device: str, onednn: bool
) -> None:
    """With oneDNN off the fused loops take their plain-GEMM path (torch.mm, unpacked weights)."""
    if device == "cuda" and not onednn:
        pytest.skip("oneDNN is a CPU library")
    with backend_flags((torch.backends.mkldnn, "enabled", onednn)):  # flags() warns about TF32
        compare_with_torch(backend, cell, num_layers, device)


def compare_with_torch(backend: str, cell: str, num_layers: int, device: str) -> None:
    torch.manual_seed(0)
    ref = reference(cell, num_layers).to(device)
    module = build_recurrent(backend, cell, IN, H, num_layers).to(device)
    module.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, IN, device=device)
    state = random_state(cell, num_layers, device=device)
    x_ref, x_mod = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, s_ref = ref(x_ref, state if cell == "lstm" else state[0])
    y_mod, s_mod = module(x_mod, state)
    s_ref = as_tuple(s_ref)
    assert isinstance(s_mod, tuple) and len(s_mod) == len(s_ref)
    # A loss that weighs every output and final-state entry differently.
    weights = [torch.randn_like(t) for t in (y_ref, *s_ref)]
    sum(((t * w).sum() for t, w in zip((y_ref, *s_ref), weights, strict=True))).backward()
    sum(((t * w).sum() for t, w in zip((y_mod, *s_mod), weights, strict=True))).backward()
    assert_close(y_mod, y_ref, "output")
    for k, (a, b) in enumerate(zip(s_mod, s_ref, strict=True)):
        assert_close(a, b, f"final state[{k}]")
    assert_close(x_mod.grad, x_ref.grad, "input gradient")
    for (name, p), (ref_name, p_ref) in zip(
        module.named_parameters(), ref.named_parameters(), strict=True
    ):
        assert name == ref_name
        assert_close(p.grad, p_ref.grad, f"gradient of {name}")


@pytest.mark.parametrize("backend", ["modular", "compile", "cudnn"])
def test_projection_matches_torch(backend: str) -> None:
    torch.manual_seed(0)
    ref = reference("lstm", 2, proj_size=4)
    module = build_recurrent(backend, "lstm", IN, H, 2, proj_size=4)
    module.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, IN)
    state = random_state("lstm", 2, h_out=4)
    y_ref, s_ref = ref(x, state)
    y_mod, s_mod = module(x, state)
    assert_close(y_mod, y_ref, "output")
    (y_ref.sum() + s_ref[1].sum()).backward()
    (y_mod.sum() + s_mod[1].sum()).backward()
    assert_close(module.weight_hr_l1.grad, ref.weight_hr_l1.grad, "gradient of weight_hr_l1")


@pytest.mark.parametrize("cell", CELLS)
def test_checkpoint_moves_between_backends(cell: str) -> None:
    torch.manual_seed(0)
    trained = build_recurrent("cudnn", cell, IN, H, 2)
    x = torch.randn(B, T, IN)
    y_ref, _ = trained.eval()(x)
    keys = list(trained.state_dict())
    assert keys == list(reference(cell, 2).state_dict())
    for backend in BACKENDS:
        module = build_recurrent(backend, cell, IN, H, 2)
        assert list(module.state_dict()) == keys
        module.load_state_dict(trained.state_dict())
        assert_close(module.eval()(x)[0], y_ref, f"{backend} output from a cudnn checkpoint")


def test_option_checkpoint_moves_between_modular_and_compile() -> None:
    torch.manual_seed(0)
    opts = dict(layernorm=True, peephole=True, zoneout=0.2, cell_clip=3.0, proj_size=4)
    a = build_recurrent("modular", "lstm", IN, H, 2, **opts).eval()
    b = build_recurrent("compile", "lstm", IN, H, 2, **opts).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, T, IN)
    assert_close(b(x)[0], a(x)[0], "compile output from a modular checkpoint")


def test_extra_parameters_have_their_own_names() -> None:
    module = build_recurrent("modular", "lstm", IN, H, 1, layernorm=True, peephole=True)
    extra = set(module.state_dict()) - set(reference("lstm", 1).state_dict())
    assert extra == {
        "layernorm_ih_weight_l0",
        "layernorm_hh_weight_l0",
        "layernorm_c_weight_l0",
        "layernorm_c_bias_l0",
        "weight_ci_l0",
        "weight_cf_l0",
        "weight_co_l0",
    }


@pytest.mark.parametrize(
    ("backend", "cell", "layers", "options", "message"),
    [
        ("cudnn", "lstm", 2, {"layernorm": True}, "backends that support it: modular, compile"),
        ("jit", "lstm", 2, {"zoneout": 0.1}, "not supported by backend 'jit'"),
        ("modular", "lstm", 1, {"dropout": 0.3}, "num_layers=1"),
        ("modular", "gru", 2, {"peephole": True}, "cell 'gru'; cells that support it: lstm"),
        ("modular", "lstm", 2, {"variational": True}, "has no effect"),
        (
            "modular",
            "lstm",
            2,
            {"zoneout": 1.0},
            "model.zoneout=1.0: must be a probability in [0, 1)",
        ),
        ("modular", "lstm", 2, {"dropuot": 0.1}, "not a cell option"),
        ("tpu", "lstm", 2, {}, "choose one of cudnn, jit, modular, compile"),
    ],
)
def test_check_options_names_the_problem(
    backend: str, cell: str, layers: int, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_options(backend, cell, layers, **options)
    with pytest.raises(ValueError):
        build_recurrent(backend, cell, IN, H, layers, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_with_wrong_batch_names_the_dimension(backend: str) -> None:
    module = build_recurrent(backend, "lstm", IN, H, 2)
    x = torch.randn(B, T, IN)
    wrong = (torch.zeros(2, T, H), torch.zeros(2, T, H))  # time where batch should be
    with pytest.raises(ValueError, match=r"dimension 1 \(batch\) is 6 but should be 3"):
        module(x, wrong)


def test_zoneout_eval_is_deterministic_expectation_and_train_keeps_or_updates() -> None:
    torch.manual_seed(0)
    plain = build_recurrent("modular", "lstm", IN, H, 1).eval()
    zoned = build_recurrent("modular", "lstm", IN, H, 1, zoneout=0.3)
    zoned.load_state_dict(plain.state_dict())
    x, (h0, c0) = torch.randn(B, 1, IN), random_state("lstm", 1)
    _, (h_new, c_new) = plain(x, (h0, c0))
    zoned.eval()
    _, (h1, c1) = zoned(x, (h0, c0))
    _, (h2, c2) = zoned(x, (h0, c0))
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
    assert_close(h1, 0.3 * h0 + 0.7 * h_new, "eval h = expectation")
    assert_close(c1, 0.3 * c0 + 0.7 * c_new, "eval c = expectation")
    zoned.train()
    _, (h_t, _) = zoned(x, (h0, c0))
    kept, updated = h_t == h0, (h_t - h_new).abs() < 1e-6
    assert torch.all(kept | updated) and kept.any() and updated.any()


def test_variational_masks_are_constant_across_time(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    seen: list[Tensor] = []
    original = ref_cells.recurrent_input

    def record(h: Tensor, opt: ref_cells.StepOptions) -> Tensor:
        out = original(h, opt)
        seen.append((out == 0) & (h != 0))  # (B, H) units dropped at this step
        return out

    monkeypatch.setattr(ref_cells, "recurrent_input", record)
    for variational in (True, False):
        seen.clear()
        module = build_recurrent(
            "modular", "gru", IN, H, 2, dropout=0.5, recurrent_dropout=0.5, variational=variational
        ).train()
        module(torch.randn(B, T, IN), (torch.randn(2, B, H),))
        per_layer = [seen[:T], seen[T:]]
        constant = all(torch.equal(steps[0], s) for steps in per_layer for s in steps)
        assert constant == variational
    # Between layers: one (B, H) mask for the whole window.
    module = build_recurrent("modular", "lstm", IN, H, 2, dropout=0.5, variational=True).train()
    seq = torch.ones(T, B, H)
    dropped = ref_cells.between_layers(seq, module.dropout, module.variational, True) == 0
    assert dropped.any() and torch.equal(dropped, dropped[:1].expand_as(dropped))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_drop_touches_weight_hh_only_in_training(backend: str) -> None:
    torch.manual_seed(0)
    plain = build_recurrent(backend, "lstm", IN, H, 2)
    dropped = build_recurrent(backend, "lstm", IN, H, 2, weight_drop=0.5)
    dropped.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in dropped.state_dict().items()}
    x = torch.randn(B, T, IN)
    assert_close(dropped.eval()(x)[0], plain.eval()(x)[0], "eval output")
    y_train, _ = dropped.train()(x)
    # From a zero state the first step never sees weight_hh, later steps do.
    assert_close(y_train[:, 0], plain(x)[0][:, 0], "first step, zero state")
    assert (y_train[:, 1:] - plain(x)[0][:, 1:]).abs().max() > 1e-4
    for k, v in dropped.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by the forward pass"


def test_layernorm_statistics_make_the_cell_scale_invariant() -> None:
    """Ba et al.: LN(x W_ih) and LN(h W_hh) ignore the scale of the weights; LN(c) its own."""
    torch.manual_seed(0)
    for cell in CELLS:
        module = build_recurrent("modular", cell, IN, H, 1, layernorm=True).eval()
        x, state = torch.randn(B, T, IN), random_state(cell, 1)
        y, _ = module(x, state)
        with torch.no_grad():
            module.weight_ih_l0.mul_(3.0)
            module.weight_hh_l0.mul_(2.0)
        assert_close(module(x, state)[0], y, f"{cell} output after rescaling weights", atol=5e-4)
    # The normalised projection itself has zero mean and unit variance per row.
    xp = F.linear(torch.randn(T, B, IN), module.weight_ih_l0)
    normed = F.layer_norm(xp, xp.shape[-1:], module.layernorm_ih_weight_l0)
    assert_close(normed.mean(-1), torch.zeros(T, B), "row mean")
    assert_close(normed.var(-1, unbiased=False), torch.ones(T, B), "row variance", atol=1e-3)


def test_fused_layernorm_lstm_matches_the_autograd_cell() -> None:
    """The hand-differentiated layer-normed loop (modular and compile run it) computes what the
    reference cell does, in float64: the comparison is of the math, not of float32 rounding."""
    torch.manual_seed(0)
    module = build_recurrent("modular", "lstm", IN, H, 2, layernorm=True).double()
    assert module.fused_layernorm
    with torch.no_grad():  # LayerNorm gains and biases away from their 1 and 0 init
        for name, p in module.named_parameters():
            if name.startswith("layernorm"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(B, T, IN, dtype=torch.float64, requires_grad=True)
    state = tuple(s.double().requires_grad_() for s in random_state("lstm", 2))
    results = []
    for fused in (True, False):
        module.fused_layernorm = fused
        y, (h, c) = module(x, state)
        inputs = [x, *state, *module.parameters()]
        grads = torch.autograd.grad((y.sin().sum() + h.sum() + (2 * c).sum()), inputs)
        results.append([y, h, c, *grads])
    names = ["y", "h", "c", "x", "h0", "c0", *(n for n, _ in module.named_parameters())]
    for name, a, b in zip(names, *results, strict=True):
        assert_close(a, b, name, atol=1e-12)


def test_peephole_forget_bias_and_cell_clip() -> None:
    torch.manual_seed(0)
    plain = build_recurrent("modular", "lstm", IN, H, 1)
    peep = build_recurrent("modular", "lstm", IN, H, 1, peephole=True)
    peep.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(B, T, IN)
    with torch.no_grad():
        for name in ("weight_ci_l0", "weight_cf_l0", "weight_co_l0"):
            getattr(peep, name).zero_()
    assert_close(peep(x)[0], plain(x)[0], "peephole with zero weights = plain LSTM")
    biased = build_recurrent("cudnn", "lstm", IN, H, 1, forget_bias=1.0)
    f_slice = biased.bias_ih_l0[H : 2 * H]
    assert f_slice.min() > 1.0 - 1 / H**0.5 - 1e-6 and f_slice.max() < 1.0 + 1 / H**0.5
    clipped = build_recurrent("modular", "lstm", IN, H, 1, cell_clip=0.05)
    _, (_, c) = clipped(10 * x)
    assert c.abs().max() <= 0.05 + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_between_layer_dropout_only_in_training(backend: str) -> None:
    module = build_recurrent(backend, "gru", IN, H, 2, dropout=0.5)
    x = torch.randn(B, T, IN)
    assert torch.equal(module.eval()(x)[0], module(x)[0])
    torch.manual_seed(1)
    a = module.train()(x)[0]
    assert not torch.equal(a, module(x)[0])


def full_options(backend: str, cell: str) -> dict:
    """Every option the backend supports for this cell, switched on."""
    on = dict(
        dropout=0.2,
        layernorm=True,
        recurrent_dropout=0.2,
        variational=True,
        weight_drop=0.2,
        zoneout=0.1,
        forget_bias=1.0,
        cell_clip=5.0,
        peephole=True,
        proj_size=4,
    )
    return {k: v for k, v in on.items() if k in implementations(cell)[backend].options}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_runs_and_state_carries(backend: str, cell: str, device: str) -> None:
    """The TBPTT engine runs under autocast and carries the state as float32 between windows."""
    torch.manual_seed(0)
    for options in ({}, full_options(backend, cell)):
        module = build_recurrent(backend, cell, IN, H, 2, **options).to(device).train()
        x = torch.randn(B, T, IN, device=device)
        state = None
        for _ in range(2):
            with torch.autocast(device, dtype=torch.bfloat16):
                y, state = module(x, state)
            assert torch.isfinite(y.float()).all()
            y.float().sum().backward()
            state = tuple(s.detach().float() for s in state)
        assert all(p.grad is not None for p in module.parameters())


def test_jit_warns_about_deprecation_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_LOOPS", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_recurrent("jit", "lstm", IN, H, 1)
        build_recurrent("jit", "gru", IN, H, 1)
    deprecations = [w for w in caught if "deprecat" in str(w.message).lower()]
    assert len(deprecations) == 1 and "compile" in str(deprecations[0].message)


def test_kernel_name_says_what_runs() -> None:
    cpu = torch.device("cpu")
    names = {b: kernel_name(build_recurrent(b, "lstm", IN, H, 1), cpu) for b in BACKENDS}
    assert names["cudnn"] == "oneDNN/native fused"
    assert names["jit"] == "TorchScript loop, oneDNN GEMM"
    assert names["compile"] == "torch.compile (inductor) loop, oneDNN GEMM"
    assert names["modular"] == "python loop, oneDNN GEMM"
    on_gpu = kernel_name(build_recurrent("cudnn", "gru", IN, H, 1), torch.device("cuda"))
    assert on_gpu == ("cuDNN" if torch.backends.cudnn.is_available() else "native fused")
    layernorm = kernel_name(build_recurrent("compile", "lstm", IN, H, 1, layernorm=True), cpu)
    assert layernorm.startswith("python (layernorm: not torch.compile")  # its loop stays eager


@pytest.mark.slow
def test_compile_runs_any_number_of_shapes_in_one_process() -> None:
    """Dynamo keeps 8 graphs per code object; a dozen (batch, hidden) shapes must still run."""
    torch.manual_seed(0)
    for k in range(12):
        batch, hidden = 1 + k % 4, 2 + k // 4
        module = build_recurrent("compile", "lstm", IN, hidden, 1)
        ref = nn.LSTM(IN, hidden, 1, batch_first=True)
        ref.load_state_dict(module.state_dict())
        x = torch.randn(batch, 2, IN)
        assert_close(module(x)[0], ref(x)[0], f"output at batch {batch}, hidden {hidden}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_and_pickle_give_a_module_that_computes_the_same(backend: str, cell: str) -> None:
    """EMA/SWA averaging, NT-ASGD and torch.save(module) copy the whole module."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    module = build_recurrent(backend, cell, IN, H, 2).eval()
    x = torch.randn(B, T, IN)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    copies = [
        copy.deepcopy(module),
        pickle.loads(pickle.dumps(module)),
        torch.load(buffer, weights_only=False),
    ]
    for clone in copies:
        assert torch.equal(clone(x)[0], module(x)[0])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_empty_outputs_and_zero_time_steps_is_an_error(
    backend: str, cell: str
) -> None:
    module = build_recurrent(backend, cell, IN, H, 2)
    x = torch.randn(0, T, IN, requires_grad=True)
    y, state = module(x)
    assert y.shape == (0, T, H)
    assert [tuple(s.shape) for s in state] == module.state_shapes(0) == [(2, 0, H)] * len(state)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape  # backward reached the input
    assert all(p.grad is None or not p.grad.any() for p in module.parameters())  # and added 0
    with pytest.raises(ValueError, match=r"no time steps \(T=0\)"):
        module(torch.randn(B, 0, IN))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_planner_interface(backend: str, cell: str) -> None:
    """state_shapes match what forward returns; the activation estimate is memory.py's formula."""
    proj = 4 if cell == "lstm" and backend != "jit" else 0
    module = build_recurrent(backend, cell, IN, H, 2, proj_size=proj)
    out = proj or H
    _, state = module(torch.randn(B, T, IN))
    assert module.state_shapes(B) == [tuple(s.shape) for s in state]
    assert module.num_states == len(state) and module.output_size == out
    gates = 4 if cell == "lstm" else 3
    per_layer = [(IN if k == 0 else out) + gates * H + H + out for k in range(2)]
    assert module.activation_elements_per_step(B) == B * sum(per_layer)


def onednn_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the process's verdicts, so the next use checks the fast paths again."""
    from seqtrain.cells import onednn

    monkeypatch.setattr(onednn, "_VERDICT", {})
    monkeypatch.setattr(onednn, "_OPS", {})


def broken(kind: str, real: object) -> object:
    """A private op as a torch upgrade might leave it."""

    def op(*args: object) -> object:
        if kind == "raises":
            raise RuntimeError("unexpected argument count")
        out = real(*args)  # type: ignore[operator]
        return tuple(o + 1 for o in out) if isinstance(out, tuple) else out + 1

    return op


@pytest.mark.parametrize("kind", ["missing", "raises", "wrong"])
@pytest.mark.parametrize("path", ["gemm", "pack", "weight_grads"])
def test_a_broken_onednn_op_falls_back_with_one_warning(
    path: str, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from seqtrain.cells import onednn

    if not onednn._X86 or not torch.backends.mkldnn.is_available():
        pytest.skip("the oneDNN paths run on x86 CPUs only")
    onednn_reset(monkeypatch)
    victim = onednn.PRIVATE_OPS[path][0]
    real_find = onednn.find

    def find(op: str) -> object:
        if op != victim:
            return real_find(op)
        if kind == "missing":
            raise AttributeError(f"'_OpNamespace' 'mkldnn' object has no attribute '{op}'")
        return broken(kind, real_find(op))

    monkeypatch.setattr(onednn, "find", find)
    with caplog.at_level("WARNING", logger="seqtrain.cells"):
        for backend in ("modular", "jit"):
            compare_with_torch(backend, "lstm", 2, "cpu")
    warned = [r for r in caplog.records if "failed its check" in r.getMessage()]
    assert len(warned) == 1 and f"'{path}'" in warned[0].getMessage()
    assert onednn._VERDICT[path] is False
    assert onednn.enabled() == (path != "gemm")


@pytest.mark.parametrize("kind", ["missing", "reordered"])
def test_flat_weights_fall_back_to_the_named_parameters(
    kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A torch without nn.RNNBase's private list, or laying it out otherwise: the weight list
    comes from the named parameters, with one warning, and weight-drop drops weight_hh only."""
    from seqtrain.cells import flat_weights

    def private(module: nn.RNNBase) -> tuple[list[Tensor], list[str]]:
        if kind == "missing":
            raise AttributeError("'LSTM' object has no attribute '_flat_weights'")
        weights, names = list(module._flat_weights), list(module._flat_weights_names)
        return weights[::-1], names[::-1]

    monkeypatch.setattr(flat_weights, "_VERDICT", {})
    monkeypatch.setattr(flat_weights, "private", private)
    with caplog.at_level("WARNING", logger="seqtrain.cells"):
        for cell in CELLS:
            compare_with_torch("cudnn", cell, 2, "cpu")
        test_weight_drop_touches_weight_hh_only_in_training("cudnn")
    assert flat_weights._VERDICT["flat_weights"] is False
    assert sum("_flat_weights failed its check" in r.getMessage() for r in caplog.records) == 1


def test_training_is_the_same_with_the_onednn_fast_paths_off_or_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three updates of a tiny language model through the TBPTT engine: the losses with every
    private op refused equal those with the fast paths, to float32 rounding."""
    from seqtrain.cells import onednn
    from seqtrain.data import DataSpec
    from seqtrain.model import ModelConfig
    from seqtrain.tasks import LanguageModelling, build_model

    def refuse(op: str) -> object:
        raise AttributeError(op)

    def losses(fast: bool) -> list[float]:
        onednn_reset(monkeypatch)
        if not fast:
            monkeypatch.setattr(
                onednn, "find", lambda op: (_ for _ in ()).throw(AttributeError(op))
            )
        else:
            monkeypatch.setattr(onednn, "find", onednn.find)
        torch.manual_seed(0)
        task = LanguageModelling(DataSpec("tokens", 32, 32))
        model = build_model(ModelConfig(backend="modular", embedding_size=8, hidden_size=16), task)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        data = torch.randint(0, 32, (4, 17))
        out, state = [], None
        for _ in range(3):
            logits, state = model(data[:, :-1], state)
            loss = F.cross_entropy(logits.reshape(-1, 32), data[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = tuple(s.detach() for s in state)
            out.append(loss.item())
        return out

    fast, public = losses(True), losses(False)
    assert onednn._VERDICT == {"gemm": False}
    assert fast == pytest.approx(public, abs=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_matches_float32_within_bf16_tolerance(backend: str, cell: str) -> None:
    """bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.0039). Unit-scale outputs through
    6 steps and 2 layers, each rounding its inputs, weights and gates, stay within a few steps:
    atol 2e-2 (about five bf16 steps at 1.0; the largest difference seen here is 2e-3). Finite
    outputs alone would pass a backend computing something else entirely."""
    torch.manual_seed(0)
    module = build_recurrent(backend, cell, IN, H, 2).eval()
    x = torch.randn(B, T, IN)
    y32, s32 = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = module(x)
    assert_close(y16.float(), y32, "bf16 output", atol=2e-2)
    for k, (a, b) in enumerate(zip(s16, s32, strict=True)):
        assert_close(a.float(), b, f"bf16 final state[{k}]", atol=2e-2)


@pytest.mark.parametrize("backend", ["jit", "modular", "compile"])
def test_plain_tanh_math_matches_torch(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused loops' plain variant (run on GPUs and in bfloat16), forced on a float32 CPU."""
    from seqtrain.cells import fused

    monkeypatch.setattr(fused, "SIGMOID_TANH", False)
    compare_with_torch(backend, "lstm", 2, "cpu")
    torch.manual_seed(0)
    module = build_recurrent(backend, "lstm", IN, H, 1, layernorm=backend != "jit")
    x = torch.randn(B, T, IN)
    y_plain = module(x)[0]
    monkeypatch.setattr(fused, "SIGMOID_TANH", True)
    assert_close(module(x)[0], y_plain, "plain vs sigmoid-tanh variant")
