"""The time loops each stack backend runs: eager Python, TorchScript (jit), or eager loops around
torch.compile'd steps (compile).

jit scripts the whole fused loops; compile compiles only the per-step math (the fused loop's gate
math, or the whole autograd cell when options need it), so compiling takes seconds instead of
unrolling T steps. Nothing here is stored on a module: modules look their loops up by backend
name, so they survive copy.deepcopy and pickle.
"""

from __future__ import annotations

import functools
import logging
import time
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from seqtrain.cells import fused
from seqtrain.cells.onednn import mm_t
from seqtrain.cells.reference import gru_cell, lstm_cell

log = logging.getLogger("seqtrain.cells")
_WARNED: set[str] = set()  # compile failures already reported (one warning per step function)


def fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn with a code object of its own: dynamo keeps its compiled graphs per code object."""
    code = fn.__code__.replace()
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


class CompiledStep:
    """torch.compile of one step function, a separately compiled copy per key.

    Dynamo caches at most `recompile_limit` (8) graphs per code object and, with fullgraph=True,
    raises at the next shape; the key names everything a graph specialises on (shapes, dtype,
    device, modes), and each key compiles its own copy of the code, so any number of shapes
    works. A copy that fails to compile runs the eager function instead, with one warning.
    """

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what = fn, what
        self.by_key: dict[Hashable, Callable[..., Any]] = {}

    def get(self, key: Hashable) -> Callable[..., Any]:
        step = self.by_key.get(key)
        if step is None:
            step = self.by_key[key] = _FirstCall(self, key)
        return step


class _FirstCall:
    """Compile at the first call (logging how long it took), fall back to eager if that fails,
    and leave the plain compiled function in the cache for later windows."""

    def __init__(self, owner: CompiledStep, key: Hashable) -> None:
        self.owner, self.key = owner, key
        self.target: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.target is not None:
            return self.target(*args)
        owner = self.owner
        compiled = torch.compile(fresh_copy(owner.fn), dynamic=False, fullgraph=True)
        start = time.perf_counter()
        try:
            out = compiled(*args)
        except Exception as err:
            if owner.what not in _WARNED:
                _WARNED.add(owner.what)
                log.warning(
                    "torch.compile of the %s failed (%s: %s); running it eagerly",
                    owner.what,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
            compiled = owner.fn
            out = compiled(*args)
        else:
            log.info("torch.compile: %s ready in %.1f s", owner.what, time.perf_counter() - start)
        self.target = owner.by_key[self.key] = compiled
        return out


def tensor_key(*tensors: Tensor) -> tuple[Hashable, ...]:
    """What a compiled graph specialises on, besides the options: shapes, dtypes, device, grad
    and autocast modes."""
    dev = tensors[0].device
    return (
        tuple((t.shape, t.dtype, t.requires_grad) for t in tensors),
        dev,
        torch.is_grad_enabled(),
        torch.is_autocast_enabled(dev.type),
    )


def _lstm_forward_stepwise(
    steps: CompiledStep, gates: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, doubled: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fused._lstm_forward_loop with the gate math in a separate (compiled) step function."""
    T, B = gates.shape[0], gates.shape[1]
    H = c0.shape[1]
    cs, tcs, hs = (gates.new_empty((T, B, H)) for _ in range(3))
    g_t, c_t, tc_t, h_t = gates.unbind(0), cs.unbind(0), tcs.unbind(0), hs.unbind(0)
    step = steps.get((tensor_key(gates, c0), doubled))
    h, c = h0, c0
    for t in range(T):
        g_t[t].add_(mm_t(h, w_hh))
        step(g_t[t], c, c_t[t], tc_t[t], h_t[t], doubled)
        h, c = h_t[t], c_t[t]
    return gates, cs, tcs, hs


def _gru_forward_stepwise(
    steps: CompiledStep, gates: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """fused._gru_forward_loop with the gate math in a separate (compiled) step function."""
    T, B = gates.shape[0], gates.shape[1]
    H = h0.shape[1]
    hn, hs = gates.new_empty((T, B, H)), gates.new_empty((T, B, H))
    g_t, hn_t, h_t = gates.unbind(0), hn.unbind(0), hs.unbind(0)
    step = steps.get(tensor_key(gates, h0))
    h = h0
    for t in range(T):
        step(g_t[t], mm_t(h, w_hh).add_(b_hh), h, hn_t[t], h_t[t])
        h = h_t[t]
    return gates, hn, hs


class Loops:
    """The time loops and steps one backend runs: eager, TorchScript, or torch.compile steps."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.lstm_forward, self.gru_forward = fused._lstm_forward_loop, fused._gru_forward_loop
        self.lstm_backward, self.gru_backward = fused._lstm_backward_loop, fused._gru_backward_loop
        self.ln_lstm_forward = fused._ln_lstm_forward_loop
        self.ln_lstm_backward = fused._ln_lstm_backward_loop
        self._cells: dict[Callable[..., Any], CompiledStep] = {}
        self._names = {lstm_cell: "LSTM cell with options", gru_cell: "GRU cell with options"}
        if kind == "jit":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns per scripted function; we warn once
                self.lstm_forward = torch.jit.script(fused._lstm_forward_loop)
                self.gru_forward = torch.jit.script(fused._gru_forward_loop)
                self.lstm_backward = torch.jit.script(fused._lstm_backward_loop)
                self.gru_backward = torch.jit.script(fused._gru_backward_loop)
            warnings.warn(
                "backend 'jit' uses torch.jit.script, which PyTorch deprecates; "
                "prefer backend 'compile' on new setups",
                FutureWarning,
                stacklevel=6,  # the caller of build_recurrent
            )
        elif kind == "compile":
            lstm_step = CompiledStep(fused._lstm_step_into, "LSTM step")
            gru_step = CompiledStep(fused._gru_step_into, "GRU step")
            self.lstm_forward = functools.partial(_lstm_forward_stepwise, lstm_step)
            self.gru_forward = functools.partial(_gru_forward_stepwise, gru_step)

    def step(self, fn: Callable[..., Any], key: Hashable) -> Callable[..., Any]:
        """The per-step function `fn` (an autograd cell) as this backend runs it, for `key`."""
        if self.kind != "compile":
            return fn
        if fn not in self._cells:
            what = self._names.get(fn, f"{getattr(fn, '__qualname__', fn)} step")
            self._cells[fn] = CompiledStep(fn, what)
        return self._cells[fn].get(key)


_LOOPS: dict[str, Loops] = {}


def loops(kind: str) -> Loops:
    """Build each kind once per process: scripting is slow and warns, compiled steps are cached."""
    if kind not in _LOOPS:
        _LOOPS[kind] = Loops(kind)
    return _LOOPS[kind]
