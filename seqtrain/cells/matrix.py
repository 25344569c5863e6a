"""What the matrix-state cells (gdn.py: Gated DeltaNet, mlstm.py: mLSTM) share: the stack that
carries their tuple state, the short causal convolution, the per-chunk masks for resets.

A matrix-state layer keeps per stream and head a (d_k, d_v) matrix S (plus small extras) and
reads it with a query: o_t = S_t^T q_t. Each layer runs in one of three forms that agree:

    step       one step at a time (`MatrixLayer.step`): the specification, and what sampling
               uses (the chunk form runs it for a one-step window)
    chunk      chunks of `chunk` steps: dense (c, c) matmuls inside a chunk, the state carried
               from chunk to chunk (training)
    quadratic  the chunk form with one chunk over the whole window: the attention-like
               (T, T) form, for tests on short windows

Resets: at a reset position t of stream n the layer continues exactly as a fresh run from a zero
state (every state tensor zero, the convolution's tail included), inside the window. In the chunk
form a reset splits a chunk into segments: terms across a segment boundary are masked and the
carried state reaches only the first segment (`Segments`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells.base import Builder, State, check_window
from seqtrain.cells.compiled import CompiledStep, tensor_key

FORMS = ("chunk", "step", "quadratic")
DEFAULT_CHUNK = 64  # steps per chunk in training: (64, 64) matmuls, T / 64 carried states
DEFAULT_HEADS = 1  # model.num_heads unset: one head of hidden_size


def at_least_float32(t: Tensor) -> Tensor:
    """float32 at least: under autocast the projections may be bf16; the recurrence never is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Segments(NamedTuple):
    """Which steps of a chunk see each other when streams reset inside it (c steps)."""

    same: Tensor  # (B, 1, c, c) bool: s <= t and no reset in (s, t]
    first: Tensor  # (B, 1, c) bool: no reset in [0, t]: step t sees the carried state
    start: Tensor  # (B, 1, c) long: the step the segment of t starts at (0 or a reset)


def segments(resets: Tensor | None, B: int, c: int, device: torch.device) -> Segments:
    """The masks of one chunk; resets (B, c) bool or None (no resets)."""
    causal = torch.ones(c, c, dtype=torch.bool, device=device).tril()  # (c, c)
    steps = torch.arange(c, device=device)
    if resets is None:
        return Segments(
            causal.expand(B, 1, c, c),
            torch.ones(B, 1, c, dtype=torch.bool, device=device),
            torch.zeros(B, 1, c, dtype=torch.long, device=device),
        )
    seg = resets.long().cumsum(1)  # (B, c): segment number of each step
    same = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, c, c)
    start = torch.where(resets, steps, 0).cummax(1).values  # (B, c)
    return Segments(same[:, None], (seg == 0)[:, None], start[:, None])


def in_chunks(
    chunk_fn: Callable[..., tuple[Tensor, object]],
    inputs: tuple[Tensor, ...],
    state: object,
    resets: Tensor | None,
    chunk: int,
    compiled: bool = False,
) -> tuple[Tensor, object]:
    """A window as chunks of `chunk` steps: `chunk_fn(*inputs of the chunk, state, resets of the
    chunk) -> (outputs, state)`, the state carried from chunk to chunk. Time is dimension 2 of
    every input ((B, N, T, ...)); the outputs are joined along it. The inputs are split, not
    sliced: a slice's backward writes its gradient into a zero tensor of the whole window, a
    split's joins the chunks' gradients once. `compiled` runs chunk_fn through torch.compile
    (model.backend=compile), one graph per chunk shape; the loop over chunks stays eager."""
    run = _compiled(chunk_fn) if compiled else chunk_fn
    out = []
    pieces = zip(*(t.split(chunk, 2) for t in inputs), strict=True)
    for a, chunk_inputs in zip(range(0, inputs[0].shape[2], chunk), pieces, strict=True):
        r = None if resets is None else resets[:, a : a + chunk]
        o, state = run(*chunk_inputs, state, r)
        out.append(o)
    return torch.cat(out, 2), state


_COMPILED: dict[Callable[..., object], CompiledStep] = {}  # per process, not on the modules


def _compiled(chunk_fn: Callable[..., tuple[Tensor, object]]) -> Callable[..., tuple]:
    """chunk_fn compiled per shape, dtype, grad and autocast mode of its tensors (a chunk with
    resets has one tensor more: its own graph); compiled.CompiledStep takes any number."""
    name = f"{chunk_fn.__module__.rsplit('.', 1)[-1]} chunk"
    step = _COMPILED.setdefault(chunk_fn, CompiledStep(chunk_fn, name))

    def run(*args: object) -> tuple[Tensor, object]:
        flat = [t for a in args for t in (a if isinstance(a, tuple) else (a,))]
        return step.get(tensor_key(*(t for t in flat if isinstance(t, Tensor))))(*args)

    return run


def pairwise_sums(g: Tensor) -> Tensor:
    """X[..., t, s] = sum of g over (s, t] for s <= t (0 above the diagonal): g (..., c) ->
    (..., c, c). Summed term by term, not as cumsum(g)[t] - cumsum(g)[s]: that difference of two
    large sums loses eps * |cumsum| in float32, a relative error of exp(X) that grows with c."""
    c = g.shape[-1]
    later = torch.ones(c, c, dtype=torch.bool, device=g.device).triu(1)  # (s, j): j > s
    return g[..., None, :].masked_fill(~later, 0.0).cumsum(-1).transpose(-1, -2)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time, kernel K, carrying the last K - 1 inputs.

    ``weight (channels, K)``, column K - 1 on the current step (nn.Conv1d's depthwise weight
    without its middle dimension). Init: nn.Conv1d's, U(+-1/sqrt(K))."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        self.weight = nn.Parameter(torch.empty(channels, size))
        bound = size**-0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def step(self, u: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """u (B, C) this step's input, tail (B, K - 1, C) the inputs before -> output, tail."""
        window = torch.cat([tail, u[:, None]], 1)  # (B, K, C)
        return (window * self.weight.t()).sum(1), window[:, 1:]

    def forward(self, u: Tensor, tail: Tensor, resets: Tensor | None) -> tuple[Tensor, Tensor]:
        """u (B, T, C), tail (B, K - 1, C), resets (B, T) -> output (B, T, C), the new tail.
        An input before a reset of its stream is invisible to the steps from the reset on."""
        B, T, _ = u.shape
        K = self.size
        padded = torch.cat([tail.to(u.dtype), u], 1)  # (B, K - 1 + T, C)
        seg = None
        if resets is not None:  # the tail is segment 0, the window's steps count resets
            seg = F.pad(resets.long().cumsum(1), (K - 1, 0))  # (B, K - 1 + T)
        out = padded[:, K - 1 :] * self.weight[:, K - 1]
        for j in range(K - 1):  # the input j + 1 - K steps back
            term = padded[:, j : j + T] * self.weight[:, j]  # (B, T, C)
            if seg is not None:
                term = term * (seg[:, j : j + T] == seg[:, K - 1 :])[..., None]
            out = out + term
        new_tail = padded[:, T:]  # (B, K - 1, C): the last K - 1 inputs
        if resets is not None and K > 1:  # inputs before a reset are not the tail of a fresh run
            new_tail = new_tail * (seg[:, T:] == seg[:, -1:])[..., None]
        return out, new_tail


class MatrixLayer(nn.Module):
    """One layer of a matrix-state cell; subclasses define the state and the three forms.

    ``state_shapes(batch)`` the layer's state tensors' shapes (batch first), ``step(x_t, state,
    reset)`` one step, ``window(x, state, resets, chunk)`` the chunk form, ``saved_per_step``
    the memory planner's estimate; ``forward(x, state, resets, form, chunk)`` picks the form."""

    RUNS = {"modular": "python", "compile": "torch.compile'd chunks"}  # for the startup log

    def __init__(
        self, input_size: int, hidden_size: int, num_heads: int, backend: str = "modular"
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"model.hidden_size={hidden_size} is not divisible by model.num_heads={num_heads}"
            )
        self.input_size, self.hidden_size, self.num_heads = input_size, hidden_size, num_heads
        self.head_size = hidden_size // num_heads
        self.backend, self.runs = backend, self.RUNS[backend]

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], ...]:
        raise NotImplementedError

    def saved_per_step(self, batch: int, chunk: int) -> int:
        """Floating elements autograd keeps per step for backward in the chunk form."""
        raise NotImplementedError

    def step(self, x_t: Tensor, state: State, reset: Tensor | None) -> tuple[Tensor, State]:
        """One step: x_t (B, I), the state, reset (B,) bool -> y_t (B, H) and the next state."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, state: State, resets: Tensor | None, form: str, chunk: int
    ) -> tuple[Tensor, State]:
        if form == "step":
            out = []
            for t in range(x.shape[1]):
                y, state = self.step(x[:, t], state, None if resets is None else resets[:, t])
                out.append(y)
            return torch.stack(out, 1), state
        return self.window(x, state, resets, x.shape[1] if form == "quadratic" else chunk)

    def window(
        self, x: Tensor, state: State, resets: Tensor | None, chunk: int
    ) -> tuple[Tensor, State]:
        """The chunk form: x (B, T, I) -> (B, T, H) and the final state."""
        raise NotImplementedError


class MatrixStack(nn.Module):
    """`num_layers` matrix-state layers, each feeding the next; batch-first.

    ``forward(x: (B, T, I), state | None, resets: (B, T) bool | None) -> (y: (B, T, H), state)``;
    the state is a tuple of tensors, each ``(num_layers, B, ...)`` (the layer's shapes, see
    gdn.py and mlstm.py); zero state when None. ``form`` and ``chunk`` pick the form (matrix.py's
    docstring); the state runs in float32 at least whatever the autocast.

    ``resets_inside``: every form resets a stream's state at its document starts itself, so the
    engine passes a window's resets instead of cutting it into segments there."""

    resets_inside = True

    def __init__(
        self,
        cell: str,
        make_layer: Callable[[int, int], MatrixLayer],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        form: str = "chunk",
        chunk: int = DEFAULT_CHUNK,
        backend: str = "modular",
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form={form!r} is unknown; choose one of {', '.join(FORMS)}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if num_layers < 1 or chunk < 1:
            raise ValueError(f"num_layers={num_layers} and chunk={chunk} must be at least 1")
        self.cell, self.form, self.chunk, self.backend = cell, form, chunk, backend
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(make_layer(i, hidden_size) for i in sizes)
        self.num_states = len(self.layers[0].state_shapes(1))

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def kernel(self, device: torch.device) -> str:
        """What runs, for the startup log (cells.kernel_name)."""
        size = f", {self.chunk} steps a chunk" if self.form == "chunk" else ""
        return f"{self.cell}, {self.form} form{size}, {self.layers[0].runs}"

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], ...]:
        """Each state tensor's shape: the layer's, behind the layer dimension."""
        return tuple((self.num_layers, *s) for s in self.layers[0].state_shapes(batch))

    def activation_elements_per_step(self, batch: int) -> int:
        """Floating elements autograd keeps per time step for backward in the chunk form, all
        layers (each layer's `saved_per_step`): an estimate the memory planner's probe corrects,
        kept within 30% of autograd's saved tensors by tests/test_matrix_cells.py."""
        return sum(layer.saved_per_step(batch, self.chunk) for layer in self.layers)

    def _check(self, x: Tensor, state: State | None, resets: Tensor | None) -> None:
        B, T = check_window(x, self.input_size, resets)
        if state is not None:
            shapes = self.state_shapes(B)
            if not isinstance(state, tuple) or len(state) != len(shapes):
                raise ValueError(
                    f"state must be a tuple of {len(shapes)} tensors, got {type(state).__name__}"
                )
            for k, (s, want) in enumerate(zip(state, shapes, strict=True)):
                if tuple(s.shape) != want:
                    raise ValueError(
                        f"state[{k}] must be (num_layers, B, ...) = {want}, got {tuple(s.shape)}"
                    )

    def forward(
        self, x: Tensor, state: State | None = None, resets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        self._check(x, state, resets)
        if state is None:
            dtype = torch.promote_types(x.dtype, torch.float32)
            state = tuple(x.new_zeros(s, dtype=dtype) for s in self.state_shapes(x.shape[0]))
        # one step (sampling): the step form, the specification, is the chunk form's one chunk
        form = "step" if x.shape[1] == 1 and self.form == "chunk" else self.form
        finals = []
        y = x
        for k, layer in enumerate(self.layers):
            y, s = layer(y, tuple(s[k] for s in state), resets, form, self.chunk)
            finals.append(s)
        return y, tuple(torch.stack(parts) for parts in zip(*finals, strict=True))


def stack_builder(
    backend: str, make_layer: Callable[[int, int, dict[str, object], str], MatrixLayer]
) -> Builder:
    """The registry's builder of a matrix-state cell for `backend`: ``make_layer(input size,
    hidden size, options, backend)`` builds each layer from the model's options."""

    def build(
        cell: str, input_size: int, hidden_size: int, num_layers: int, options: dict[str, object]
    ) -> MatrixStack:
        def layer(i: int, h: int) -> MatrixLayer:
            return make_layer(i, h, options, backend)

        return MatrixStack(cell, layer, input_size, hidden_size, num_layers, backend=backend)

    return build
