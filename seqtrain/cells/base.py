"""What every cell family shares: the option set, the (cell, backend) table, the input checks.

A registration says which options one (cell, backend) pair runs faithfully; every "not supported"
message is derived from the registrations, so adding a cell or a backend edits no table here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from seqtrain.registry import Registry, is_import_path

State = tuple[Tensor, ...]

# Option name -> value meaning "off". Every option defaults to off so that all backends build the
# same network as nn.LSTM / nn.GRU (forget_bias 0.0, not TF's 1.0, keeps the init identical).
OPTION_DEFAULTS: dict[str, object] = {
    "dropout": 0.0,
    "layernorm": False,
    "recurrent_dropout": 0.0,
    "variational": False,
    "weight_drop": 0.0,
    "zoneout": 0.0,
    "forget_bias": 0.0,
    "cell_clip": None,
    "peephole": False,
    "proj_size": 0,
    "num_heads": None,  # matrix-state cells (gdn, mlstm): heads; None = the cell's default (1)
    "conv_size": None,  # gdn: steps of the short causal convolution; None = the cell's default (4)
}
# The options of the vector-state cells (LSTM, GRU): all but the matrix-state cells' own.
VECTOR_OPTIONS = frozenset(OPTION_DEFAULTS) - {"num_heads", "conv_size"}
_PROBABILITIES = ("dropout", "recurrent_dropout", "weight_drop", "zoneout")

# build(cell, input_size, hidden_size, num_layers, options with defaults filled in) -> module
Builder = Callable[[str, int, int, int, dict[str, object]], nn.Module]


class Implementation(NamedTuple):
    """One (cell, backend) registration: how to build it, which options it runs, the one device
    type it runs on (None: any) and `ready`, which names what this install lacks to run it (a
    package), or None."""

    build: Builder
    options: frozenset[str]
    device: str | None = None
    ready: Callable[[], str | None] | None = None


# model.cell -> {backend -> Implementation}; a module:Name path resolves to the user's class.
TABLE: Registry[dict[str, Implementation]] = Registry("model.cell")
# Backends that run any user cell named by import path, and the options they run for it.
CUSTOM: dict[str, Implementation] = {}


def register(
    cell: str,
    backend: str,
    options: Iterable[str],
    device: str | None = None,
    ready: Callable[[], str | None] | None = None,
) -> Callable[[Builder], Builder]:
    """Declare that `backend` runs built-in `cell` with `options` (besides their off values), on
    `device` only when given, once `ready()` finds nothing missing."""

    def add(build: Builder) -> Builder:
        if cell not in TABLE.names():
            TABLE.register(cell)({})
        backends = TABLE.get(cell)
        if backend in backends:
            raise ValueError(f"model.cell={cell}: backend '{backend}' is registered twice")
        backends[backend] = Implementation(build, frozenset(options), device, ready)
        return build

    return add


def backends() -> tuple[str, ...]:
    """Every registered backend, in registration order."""
    found = [b for cell in TABLE for b in TABLE.get(cell)] + list(CUSTOM)
    return tuple(dict.fromkeys(found))


def implementations(cell: str) -> dict[str, Implementation]:
    """backend -> Implementation for a built-in name or a user's module:Name (imported here, so a
    missing module is a one-line ConfigError at config time, not at the first forward)."""
    if is_import_path(cell):
        TABLE.get(cell)
        return CUSTOM
    return TABLE.get(cell)


def check_runnable(backend: str, cell: str, device: str) -> None:
    """One-line ValueError when `backend` cannot run `cell` on this `device` type or install
    (a kernel for one device only, a package it needs)."""
    impl = implementations(cell).get(backend)
    if impl is None:
        return
    if impl.device is not None and impl.device != device:
        others = [b for b, i in implementations(cell).items() if i.device in (None, device)]
        raise ValueError(
            f"model.backend={backend} runs model.cell={cell} on {impl.device} only; this run is "
            f"on {device}: choose one of {', '.join(others)} (the same parameters)"
        )
    missing = impl.ready() if impl.ready is not None else None
    if missing:
        raise ValueError(f"model.backend={backend} needs {missing}")


def _shown(value: object) -> object:
    return str(value).lower() if isinstance(value, bool) else value


def active(name: str, value: object) -> bool:
    return value is not None and value != OPTION_DEFAULTS[name]


def check_options(backend: str, cell: str, num_layers: int, **options: object) -> None:
    """Reject a configuration no backend would run faithfully, with a one-line ValueError.

    Raising at startup beats nn.LSTM's habit of warning (dropout with one layer) or silently
    running something else than what the config says.
    """
    known = backends()
    if backend not in known:
        raise ValueError(f"model.backend={backend!r} is unknown; choose one of {', '.join(known)}")
    impls = implementations(cell)
    if backend not in impls:
        raise ValueError(
            f"model.backend={backend!r} does not run model.cell={cell}; "
            f"backends that run it: {', '.join(impls)}"
        )
    if num_layers < 1:
        raise ValueError(f"model.num_layers={num_layers} must be at least 1")
    for name in options:
        if name not in OPTION_DEFAULTS:
            raise ValueError(
                f"model.{name} is not a cell option; known: {', '.join(OPTION_DEFAULTS)}"
            )
    for name in _PROBABILITIES:
        p = float(options.get(name, 0.0) or 0.0)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.{name}={p}: must be a probability in [0, 1)")
    proj = int(options.get("proj_size", 0) or 0)
    if proj < 0:
        raise ValueError(f"model.proj_size={proj} must be >= 0")
    clip = options.get("cell_clip")
    if clip is not None and not 0 < float(clip) < float("inf"):
        raise ValueError(f"model.cell_clip={clip}: must be > 0 and finite, or null (no clipping)")
    if float(options.get("dropout", 0.0) or 0.0) > 0 and num_layers == 1:
        raise ValueError(
            "model.dropout>0 with model.num_layers=1 does nothing (dropout acts between layers "
            "only); set dropout=0 or use the model's output dropout"
        )
    if options.get("variational") and not (
        float(options.get("dropout", 0.0) or 0.0) > 0
        or float(options.get("recurrent_dropout", 0.0) or 0.0) > 0
    ):
        raise ValueError(
            "model.variational=true has no effect without model.dropout or model.recurrent_dropout"
        )
    for name, value in options.items():
        if active(name, value) and name not in impls[backend].options:
            raise ValueError(_unsupported(name, value, backend, cell, impls))


def _unsupported(
    name: str, value: object, backend: str, cell: str, impls: dict[str, Implementation]
) -> str:
    """Name the backends of this cell that run the option, or else the cells that do."""
    setting = f"model.{name}={_shown(value)}"
    able = [b for b, impl in impls.items() if name in impl.options]
    if able:
        return (
            f"{setting} is not supported by backend {backend!r}; "
            f"backends that support it: {', '.join(able)}"
        )
    cells = [c for c in TABLE if any(name in i.options for i in TABLE.get(c).values())]
    what = "a custom cell (its own step)" if is_import_path(cell) else f"cell '{cell}'"
    return f"{setting} is not supported by {what}; cells that support it: {', '.join(cells)}"


def with_defaults(options: dict[str, object]) -> dict[str, object]:
    """Fill in defaults so every backend reads one complete option set."""
    full = dict(OPTION_DEFAULTS)
    full.update({k: v for k, v in options.items() if v is not None or k == "cell_clip"})
    return full


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the stack computes in: autocast's when it is on."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def check_input(x: Tensor, state: State | None, shapes: list[tuple[int, int, int]]) -> None:
    """Name the wrong dimension: a transposed batch (batch-first confusion) is the usual culprit."""
    if x.dim() != 3:
        raise ValueError(f"input must be (B, T, I) batch-first, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"input has no time steps (T=0), shape {tuple(x.shape)}; need T >= 1")
    if state is None:
        return
    n = len(shapes)
    if not isinstance(state, tuple) or len(state) != n:
        raise ValueError(f"state must be a tuple of {n} tensor(s), got {type(state).__name__}")
    for k, (s, want) in enumerate(zip(state, shapes, strict=True)):
        if s.dim() != 3:
            raise ValueError(f"state[{k}] must be (num_layers, B, H), got shape {tuple(s.shape)}")
        names = ("num_layers", "batch", "hidden")
        for d in range(3):
            if s.shape[d] != want[d]:
                hint = " (is the input batch-first?)" if d == 1 else ""
                raise ValueError(
                    f"state[{k}] dimension {d} ({names[d]}) is {s.shape[d]} but should be "
                    f"{want[d]}{hint}; state shape {tuple(s.shape)}, input shape {tuple(x.shape)}"
                )


def check_window(x: Tensor, input_size: int, resets: Tensor | None) -> tuple[int, int]:
    """(B, T) of a window for a stack that runs it whole and resets inside (resets_inside): x
    (B, T, I) batch-first with T >= 1, resets (B, T) bool or None; one ValueError naming what
    is wrong."""
    if x.dim() != 3:
        raise ValueError(f"input must be (B, T, I) batch-first, got shape {tuple(x.shape)}")
    B, T, features = x.shape
    if T == 0:
        raise ValueError("input has T=0 time steps; a window needs at least one")
    if features != input_size:
        raise ValueError(f"input size {features} != input_size={input_size}; x {tuple(x.shape)}")
    if resets is not None and (resets.dtype != torch.bool or tuple(resets.shape) != (B, T)):
        raise ValueError(
            f"resets must be a (B, T) = {(B, T)} bool tensor, got {resets.dtype} "
            f"{tuple(resets.shape)}"
        )
    return B, T


class Shapes:
    """What the memory planner reads off any stack `build_recurrent` returns, so that it needs no
    knowledge of the cell. Set by the stack: input_size, hidden_size, num_layers, output_size,
    num_states, gates (G: weight_ih has G*H rows)."""

    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    num_states: int
    gates: int

    def state_shapes(self, batch: int) -> list[tuple[int, int, int]]:
        """(num_layers, B, H_out) for h, then (num_layers, B, H) for c when there is one."""
        L, H = self.num_layers, self.hidden_size
        return [(L, batch, self.output_size), (L, batch, H)][: self.num_states]

    def activation_elements_per_step(self, batch: int) -> int:
        """Elements kept for backward per time step, all layers: each layer's input, its G gates,
        a cell-sized buffer and its output (the fused loops keep c and tanh(c), or W_hn h)."""
        H, out = self.hidden_size, self.output_size
        per_layer = [
            (self.input_size if k == 0 else out) + self.gates * H + H + out
            for k in range(self.num_layers)
        ]
        return batch * sum(per_layer)
