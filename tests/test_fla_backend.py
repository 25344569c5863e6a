"""model.backend=fla (GDN through flash-linear-attention's Triton chunk kernel, CUDA only): on CPU
the kernel is replaced by fla's own pure-PyTorch reference (or, where fla is not installed, by
seqtrain's step in its layout) run piece by piece as fla documents its variable-length batches,
which checks everything seqtrain adds (layout, scale, log decay, state in and out, resets packed
as cu_seqlens, the shared parameters); scripts/gpu_check.sh runs the real kernel against the
modular backend on CUDA. And the one-line refusals where it cannot run."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from seqtrain import cells
from seqtrain.cells import fla_backend

from .test_matrix_cells import assert_forms_agree, inputs, run


def reference_kernel(naive):
    """fla's chunk_gated_delta_rule as its docstring specifies it, computed by a naive recurrence
    with fla's naive_recurrent_gated_delta_rule's signature: q, k, v (B, T, N, d), g, beta
    (B, T, N); with cu_seqlens (B = 1) each piece [cu[i], cu[i + 1]) is a sequence of its own
    with initial_state[i], final state i."""

    def run_kernel(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=None):
        assert output_final_state and scale == 1.0
        if cu_seqlens is None:
            return naive(q, k, v, beta, g, scale, initial_state, True)
        assert q.shape[0] == 1 and len(cu_seqlens) == initial_state.shape[0] + 1
        outs, finals = [], []
        for i, (a, b) in enumerate(itertools.pairwise(cu_seqlens.tolist())):
            pieces = (t[:, a:b] for t in (q, k, v, beta, g))
            o, S = naive(*pieces, scale, initial_state[i : i + 1], True)
            outs.append(o)
            finals.append(S)
        return torch.cat(outs, 1), torch.cat(finals)

    return run_kernel


def step_by_step(q, k, v, beta, g, scale, initial_state, output_final_state):
    """fla's naive recurrence's contract computed by gdn.delta_rule_step, for where fla is not
    installed (CI): the packing is still checked against fla's documented cu_seqlens."""
    from seqtrain.cells.gdn import delta_rule_step

    S, out = initial_state, []
    for t in range(q.shape[1]):
        o, S = delta_rule_step(q[:, t] * scale, k[:, t], v[:, t], beta[:, t], g[:, t], S)
        out.append(o)
    return torch.stack(out, 1), S


@pytest.fixture(params=["fla", "step_by_step"])
def fla_on_cpu(request, monkeypatch):
    """fla_backend on CPU, its kernel replaced by fla's naive recurrence (when fla is installed)
    or by seqtrain's step (always)."""
    naive = step_by_step
    if request.param == "fla":
        why = "pip install -e '.[fla]' adds fla and triton"
        pytest.importorskip("triton", reason=why)
        module = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason=why)
        naive = module.naive_recurrent_gated_delta_rule
    monkeypatch.setattr(fla_backend, "DEVICE", "cpu")
    monkeypatch.setattr(fla_backend, "kernel", lambda: reference_kernel(naive))


def stacks(L: int = 2) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    modular = cells.build_recurrent("modular", "gdn", 5, 8, L, num_heads=2)
    fla = cells.build_recurrent("fla", "gdn", 5, 8, L, num_heads=2)
    fla.load_state_dict(modular.state_dict())  # one parameter layout: a checkpoint moves
    return modular, fla


@pytest.mark.parametrize("T", [1, 2, 37, 130])
@pytest.mark.parametrize("with_state, with_resets", [(False, False), (True, False), (True, True)])
def test_fla_backend_equals_the_modular_backend(
    T: int, with_state: bool, with_resets: bool, fla_on_cpu
) -> None:
    """Outputs, final states and every gradient (input, parameters, initial state) to 1e-5."""
    modular, fla = stacks()
    x, state, resets = inputs(modular, 3, T, torch.float32, with_state, with_resets)
    want = run(modular, x, state, resets, "chunk", 16)
    got = run(fla, x, state, resets, "chunk", 16)
    assert_forms_agree(got, want, 1e-5, f"fla T={T}")


def test_resets_become_pieces_of_one_packed_batch(fla_on_cpu, monkeypatch) -> None:
    """A stream reset at its first step and twice inside: 2 + 3 pieces, only window starts not
    reset there enter with the carried state, and each stream ends with its last piece."""
    seen = {}
    real = fla_backend.kernel()

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fla_backend, "kernel", lambda: spy)
    B, N, T, d = 2, 1, 10, 4
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, N, T, d, generator=g) for _ in range(3))
    beta, decay = torch.rand(B, N, T, generator=g), -torch.rand(B, N, T, generator=g)
    S = torch.randn(B, N, d, d, generator=g)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, 6] = True
    resets[1, [0, 3, 8]] = True
    o, final = fla_backend.gated_delta_rule(q, k, v, beta, decay, S, resets)
    assert seen["cu_seqlens"].tolist() == [0, 6, 10, 13, 18, 20]
    h0: Tensor = seen["initial_state"]
    assert torch.equal(h0[0], S[0]) and not h0[1:].any()
    tail = fla_backend.gated_delta_rule(
        *(t[1:, :, 8:] for t in (q, k, v, beta, decay)), torch.zeros_like(S[1:]), None
    )
    torch.testing.assert_close(o[1:, :, 8:], tail[0])
    torch.testing.assert_close(final[1:], tail[1])


def test_fla_off_cuda_or_missing_is_one_line(monkeypatch) -> None:
    with pytest.raises(
        ValueError,
        match="runs model.cell=gdn on cuda only; this run is on cpu: choose one of modular",
    ):
        cells.check_runnable("fla", "gdn", "cpu")
    monkeypatch.setattr(fla_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs fla and triton: pip install -e '\.\[fla\]'"):
        cells.check_runnable("fla", "gdn", "cuda")
    cells.check_runnable("modular", "gdn", "cpu")  # the others run anywhere


def test_training_with_fla_on_a_cpu_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys
) -> None:
    import sys

    from seqtrain import cli

    from .conftest import refusal

    run_dir = tmp_path / "run"
    argv = ["seqtrain", "+debug=tiny", "model.cell=gdn", "model.backend=fla"]
    monkeypatch.setattr(sys, "argv", [*argv, f"hydra.run.dir={run_dir}"])
    line = refusal(cli.main, capsys=capsys)
    assert "model.backend=fla runs model.cell=gdn on cuda only; this run is on cpu" in line
    assert not run_dir.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernel needs CUDA")
@pytest.mark.parametrize("with_resets", [False, True])
def test_fla_kernel_on_cuda_equals_the_modular_backend(with_resets: bool) -> None:
    """The real kernel (scripts/gpu_check.sh): outputs, final states and gradients of the fla
    backend against the modular one on CUDA, T = 300 (ragged against fla's 64-step chunks)."""
    pytest.importorskip("fla.ops.gated_delta_rule", reason="pip install -e '.[fla]'")
    torch.manual_seed(0)
    modular = cells.build_recurrent("modular", "gdn", 32, 128, 2, num_heads=2).cuda()
    fla = cells.build_recurrent("fla", "gdn", 32, 128, 2, num_heads=2).cuda()
    fla.load_state_dict(modular.state_dict())
    x, state, resets = inputs(modular, 4, 300, torch.float32, True, with_resets)
    x, state = x.cuda(), tuple(s.cuda() for s in state)
    resets = None if resets is None else resets.cuda()
    want = run(modular, x, state, resets, "chunk", 64)
    got = run(fla, x, state, resets, "chunk", 64)
    assert_forms_agree(got, want, 5e-3, "fla kernel on cuda (Triton's float32 dots may use TF32)")
