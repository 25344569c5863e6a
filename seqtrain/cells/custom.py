"""A user's own cell, named by import path (``model.cell=my_cells:MyCell``), run as a stack.

The cell follows the per-step protocol of PyTorch's fastrnns cells::

    class MyCell(nn.Module):
        num_states = 1                      # 1 (Elman/GRU-like: h) or 2 (LSTM-like: h, c)
        def __init__(self, input_size: int, hidden_size: int): ...
        def forward(self, x, state):        # x (B, I); state: tuple of num_states tensors (B, H)
            return h, new_state             # h (B, H) is new_state[0]

The stack makes one instance per layer (input_size for layer 0, hidden_size above), registered
as ``cells_l{k}``, and runs it step by step with the options that act per step from outside the
cell: dropout between layers, variational masks, recurrent dropout on h, zoneout on every state
tensor. ``modular`` calls the cell eagerly, ``compile`` compiles the step.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from seqtrain.cells.base import (
    CUSTOM,
    TABLE,
    Implementation,
    State,
)
from seqtrain.cells.compiled import CompiledStep, tensor_key
from seqtrain.cells.reference import (
    LayeredStack,
    StepOptions,
    recurrent_input,
    variational_mask,
    zoneout,
)
from seqtrain.errors import ConfigError

OPTIONS = frozenset({"dropout", "variational", "recurrent_dropout", "zoneout"})

# Compiled steps per cell instance (kept off the module, so it deep-copies and pickles).
_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledStep] = weakref.WeakKeyDictionary()


def cell_class(path: str) -> type[nn.Module]:
    """The user's class at `path`, checked against the protocol in one line."""
    cls = TABLE.get(path)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model.cell={path}: expected an nn.Module subclass, got {cls!r}")
    if getattr(cls, "num_states", None) not in (1, 2):
        raise ConfigError(
            f"model.cell={path}: the class needs num_states = 1 (h) or 2 (h, c), "
            f"got {getattr(cls, 'num_states', None)!r}"
        )
    return cls


PROBE = (2, 3)  # (B, T) of the probe every user cell runs when built: cheap, and B != H


@torch.no_grad()
def check_cell(cell: nn.Module, path: str, input_size: int, hidden_size: int) -> None:
    """Run a (2, 3, I) probe through the cell step by step, as the stack will, and check what
    it returns against the protocol: h (B, H) and a state of num_states tensors, each (B, H).

    A wrong width or state would otherwise fail inside training (a shape error in the head, a
    state that zoneout or the checkpoint cannot hold) or, worse, be broadcast into training.
    On the meta device (the memory check builds the model there) it checks shapes alone."""
    B, T = PROBE
    name, num_states = type(cell).__qualname__, int(cell.num_states)
    p = next(cell.parameters(), None)
    like = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    xs = torch.zeros(B, T, input_size, **like)  # (B, T, I)
    state = tuple(torch.zeros(B, hidden_size, **like) for _ in range(num_states))
    want = (B, hidden_size)

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"model.cell={path}: {name}.forward {problem}")

    for t in range(T):
        out = eval_step(cell, xs[:, t], state)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor)):
            raise refuse(f"returned {type(out).__name__}; it must return (h, state)")
        h, new = out
        if tuple(h.shape) != want:
            raise refuse(
                f"gives h of shape {tuple(h.shape)} for x of {(B, input_size)}; it must be "
                f"{want} (B, model.hidden_size)"
            )
        if not (isinstance(new, tuple | list) and all(isinstance(s, Tensor) for s in new)):
            raise refuse(f"returned a state of {type(new).__name__}; it must be a tuple of tensors")
        if len(new) != num_states:
            raise refuse(
                f"returned a state of {len(new)} tensor(s) but {name}.num_states is {num_states}"
            )
        shapes = [tuple(s.shape) for s in new]
        if any(shape != want for shape in shapes):
            raise refuse(f"returned a state of shapes {shapes}; each must be {want} (B, H)")
        state = tuple(new)


def eval_step(cell: nn.Module, x: Tensor, state: State) -> object:
    """One call of the cell in eval mode: a probe draws nothing from the run's random stream."""
    training = cell.training
    cell.eval()
    try:
        return cell(x, state)
    finally:
        cell.train(training)


def custom_step(cell: nn.Module, x: Tensor, state: State, opt: StepOptions) -> tuple[Tensor, State]:
    """One step of the user's cell with recurrent dropout on the h it sees and zoneout after."""
    h, new = cell(x, (recurrent_input(state[0], opt), *state[1:]))
    if opt.zoneout > 0:
        new = tuple(zoneout(p, n, opt) for p, n in zip(state, new, strict=True))
        h = new[0]
    return h, tuple(new)


class CustomStack(LayeredStack):
    """The user's cell, one instance per layer, under seqtrain's stack contract."""

    def __init__(
        self,
        backend: str,
        path: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        opts: dict[str, object],
    ) -> None:
        super().__init__()
        cls = cell_class(path)
        self.backend, self.cell = backend, path
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.output_size, self.num_states = hidden_size, int(cls.num_states)
        self.dropout = float(opts["dropout"])
        self.recurrent_dropout = float(opts["recurrent_dropout"])
        self.variational = bool(opts["variational"])
        self.zoneout = float(opts["zoneout"])
        for k in range(num_layers):
            self.add_module(f"cells_l{k}", cls(input_size if k == 0 else hidden_size, hidden_size))
        for k in range(min(num_layers, 2)):  # the layers above the first are alike
            check_cell(getattr(self, f"cells_l{k}"), path, self.layer_input(k), hidden_size)

    def layer_input(self, k: int) -> int:
        return self.input_size if k == 0 else self.hidden_size

    def _layer(self, k: int, seq: Tensor, state: State) -> tuple[Tensor, State]:
        cell = getattr(self, f"cells_l{k}")
        mask = variational_mask(state[0], self.recurrent_dropout, self.variational, self.training)
        opt = StepOptions(self.training, self.zoneout, self.recurrent_dropout, mask, None)
        step = custom_step
        if self.backend == "compile":
            if cell not in _COMPILED:
                _COMPILED[cell] = CompiledStep(custom_step, f"{self.cell} step")
            modes = (self.training, self.zoneout, self.recurrent_dropout, mask is None)
            step = _COMPILED[cell].get((tensor_key(seq[0], *state), modes))
        ys = []
        for x_t in seq.unbind(0):
            h, state = step(cell, x_t, state, opt)
            ys.append(h)
        return torch.stack(ys), state  # (T, B, H)

    def activation_elements_per_step(self, batch: int) -> int:
        """Measured, not modelled (the cell's math is its own): the elements one step of each
        layer saves for backward at batch 1, parameters excluded, times the batch."""
        total = 0
        for k in range(self.num_layers):
            cell = getattr(self, f"cells_l{k}")
            p = next(cell.parameters(), None)
            like = {"device": p.device, "dtype": p.dtype} if p is not None else {}
            x = torch.zeros(1, self.layer_input(k), **like)
            state = tuple(torch.zeros(1, self.hidden_size, **like) for _ in range(self.num_states))
            total += _saved_elements(cell, x, state)
        return batch * total


def _saved_elements(cell: nn.Module, x: Tensor, state: State) -> int:
    """Elements of the tensors one call of cell saves for backward, its parameters excluded."""
    params = {q.data_ptr() for q in cell.parameters()}
    seen: set[tuple[int, int]] = set()

    def pack(t: Tensor) -> Tensor:
        if t.data_ptr() not in params:
            seen.add((t.data_ptr(), t.numel()))
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cell(x.requires_grad_(), tuple(s.requires_grad_() for s in state))
    return sum(n for _, n in seen)


def _build(backend: str) -> Implementation:
    def build(cell: str, input_size: int, hidden: int, layers: int, opts: dict) -> nn.Module:
        return CustomStack(backend, cell, input_size, hidden, layers, opts)

    return Implementation(build, OPTIONS)


CUSTOM.update({backend: _build(backend) for backend in ("modular", "compile")})
