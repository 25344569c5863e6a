"""Recurrent cells (LSTM, GRU, or a user's own) behind one registry, with selectable backends.

    from seqtrain import cells
    rnn = cells.build_recurrent("modular", "lstm", input_size=256, hidden_size=512, num_layers=2)
    y, state = rnn(x, state)   # x (B, T, I) batch-first; state None = zeros; y (B, T, H_out)

``build_recurrent(backend, cell, input_size, hidden_size, num_layers, **options)`` looks
(cell, backend) up in the registry (base.py). Each registration declares the options it runs;
``check_options`` derives every "not supported" message from them. ``cell`` is a built-in name
(``lstm``, ``gru``) or a user's class as ``module:Name`` on sys.path (custom.py has the protocol).

Package layout, one module per family:
    base.py          options, the (cell, backend) table, input checks, the Shapes interface
    reference.py     the autograd cells: the specification every fast path is tested against
    cudnn.py         nn.LSTM / nn.GRU (cuDNN on GPU, oneDNN or native fused kernels on CPU)
    fused.py         the fused time loops with a hand-written backward
    compiled.py      how jit (TorchScript loops) and compile (torch.compile'd steps) run them
    stack.py         cell -> layer -> stack for modular, jit and compile; CellSpec; registrations
    custom.py        the adapter for a user's cell named by import path
    scan.py          minGRU, minLSTM, RG-LRU: diagonal recurrences trained by a chunked scan
    matrix.py        what the matrix-state cells share: their stack, short convolution, chunk masks
    gdn.py           Gated DeltaNet: the gated delta rule, trained chunkwise (WY representation)
    mlstm.py         xLSTM's mLSTM: exponential gating stabilised in log space, trained chunkwise
    fla_backend.py   model.backend=fla: GDN's recurrence through flash-linear-attention (CUDA)
    blocks.py        pre-norm residual blocks around any one-layer stack (model.block=residual),
                     their elementwise work compiled under model.backend=compile
    onednn.py        oneDNN's private ops behind a once-per-process check with a public fallback
    flat_weights.py  nn.RNNBase._flat_weights behind the same kind of check

Built-in backends register their parameters on the returned module, named and shaped exactly
like ``nn.LSTM`` / ``nn.GRU`` (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
``bias_hh_l{k}``, ``weight_hr_l{k}``; gate order i, f, g, o for LSTM and r, z, n for GRU; uniform
in +-1/sqrt(H)), so a checkpoint moves between backends untouched. A user's cell's parameters
live under ``cells_l{k}.``.

Every module ``build_recurrent`` returns is batch-first, ``forward(x: (B, T, I), state: State |
None) -> (y, State)``, ``State`` a plain tuple ``(h, c)`` or ``(h,)``, ``h: (L, B, H_out)``,
``c: (L, B, H)``; T = 0 is a ValueError, B = 0 returns empty outputs. For the memory planner each
also has ``num_states`` (1 or 2), ``output_size`` (H_out), ``state_shapes(batch)`` (the state
tensors' shapes) and ``activation_elements_per_step(batch)`` (elements kept for backward per time
step, all layers: per layer ``(input + G*H + H + H_out) * B`` for the built-ins, measured once
for a user's cell). Every module survives ``copy.deepcopy`` and ``pickle``.
"""

from __future__ import annotations

import torch
from torch import nn

from seqtrain.cells import (  # noqa: F401 - registers
    blocks,
    cudnn,
    custom,
    gdn,
    mlstm,
    onednn,
    scan,
    stack,
)
from seqtrain.cells.base import (
    OPTION_DEFAULTS,
    TABLE,
    State,
    backends,
    check_options,
    check_runnable,
    implementations,
    with_defaults,
)

BACKENDS: tuple[str, ...] = backends()  # cudnn, jit, modular, compile, fla
CELLS = TABLE  # iterates the built-in names; `in` also accepts a module:Name path

__all__ = [
    "BACKENDS",
    "CELLS",
    "OPTION_DEFAULTS",
    "State",
    "build_recurrent",
    "build_residual",
    "check_residual",
    "check_options",
    "check_runnable",
    "kernel_name",
]


def build_recurrent(
    backend: str, cell: str, input_size: int, hidden_size: int, num_layers: int, **options: object
) -> nn.Module:
    """Build a batch-first recurrent stack; see the package docstring for the contract."""
    check_options(backend, cell, num_layers, **options)
    build = implementations(cell)[backend].build
    return build(cell, input_size, hidden_size, num_layers, with_defaults(options))


def _core_options(options: dict[str, object]) -> tuple[float, dict[str, object]]:
    """A residual block's between-layer dropout (on its branch) and its core's options."""
    core = {k: v for k, v in options.items() if k != "dropout"}
    core["variational"] = bool(options.get("variational")) and bool(
        options.get("recurrent_dropout")
    )
    return float(options.get("dropout", 0.0) or 0.0), core


def check_residual(backend: str, cell: str, num_layers: int, **options: object) -> None:
    """check_options for model.block=residual: each block's core is one layer of `cell`."""
    if num_layers < 1:
        raise ValueError(f"model.num_layers={num_layers} must be at least 1")
    if options.get("proj_size"):
        raise ValueError(
            f"model.proj_size={options['proj_size']}: a residual block adds the cell's output to "
            "its input: use model.block=plain"
        )
    check_options(backend, cell, 1, **_core_options(options)[1])


def build_residual(
    backend: str, cell: str, input_size: int, hidden_size: int, num_layers: int, **options: object
) -> nn.Module:
    """`num_layers` pre-norm residual blocks, each around a one-layer stack of `cell` (blocks.py);
    the between-layer dropout acts on each block's recurrent branch."""
    check_residual(backend, cell, num_layers, **options)
    dropout, options = _core_options(options)

    def core() -> nn.Module:
        return build_recurrent(backend, cell, hidden_size, hidden_size, 1, **options)

    fused = backend == "compile"  # compile fuses the blocks' own elementwise work too
    return blocks.residual_stack(
        core, input_size, hidden_size, num_layers, dropout=dropout, fused=fused
    )


def kernel_name(module: nn.Module, device: torch.device) -> str:
    """What actually runs, for the startup log (the backend name alone does not say it)."""
    device = torch.device(device)
    if hasattr(module, "kernel"):  # a family that names its own kernel (scan.ScanStack)
        return module.kernel(device)
    if isinstance(module, blocks.ResidualStack):
        return f"residual blocks around {kernel_name(module.blocks[0].core, device)}"
    if isinstance(module, cudnn.CudnnRecurrent):
        if device.type == "cuda":
            return "cuDNN" if torch.backends.cudnn.is_available() else "native fused"
        return "oneDNN/native fused"
    if isinstance(module, stack.RecurrentStack | custom.CustomStack):
        loop = {"jit": "TorchScript", "compile": "torch.compile (inductor)"}.get(
            module.backend, "python"
        )
        if isinstance(module, custom.CustomStack):
            return f"{loop} loop, cell {module.cell}"
        if module.backend in ("jit", "compile") and module.fused_layernorm:
            # compiled.Loops scripts/compiles the plain LSTM and GRU loops only: the layernorm
            # LSTM's loop stays eager Python whatever the backend.
            loop = f"python (layernorm: not {loop})"
        if device.type == "cuda":
            return f"{loop} loop, cuBLAS GEMM"
        return f"{loop} loop, {'oneDNN' if onednn.enabled() else 'BLAS'} GEMM"
    return "python"
