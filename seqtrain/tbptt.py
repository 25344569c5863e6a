"""The truncated-BPTT engine: windows, detached state carry, TBPTT(k1, k2), chunk checkpoints.

No Lightning here: the engine takes a model, a task and a `backward` callable, so it is tested
with a plain `loss.backward` and driven by the LightningModule with `manual_backward`. What the
outputs are scored against, and how, is the task's (tasks.py): the engine knows only that a
segment's loss is summed over its target elements and an update's is their mean.

TBPTT(k1, k2) (Williams & Peng 1990): each update sees k1 new steps per stream and backpropagates
k2 steps. The engine keeps the last k2 - k1 steps it has seen (the "history") and the detached
state at the start of that history; an update re-runs history + new steps from that state and puts
the loss on the new steps only, so every prediction gets at least k2 - k1 steps of gradient
history. With k1 == k2 there is no history and this is plain TBPTT.

An activation penalty (AWD-LSTM's AR and TAR, model.ActivationPenalty) is the model's: the engine
hands it each trained segment's raw and dropped outputs, inside the checkpointed segment, and adds
it to the training objective only, never to the reported loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from seqtrain.cells import State  # (h, c) for LSTM, (h,) for GRU; each (num_layers, B, H)
from seqtrain.data import VARY_MIN, VARY_SD, Window
from seqtrain.errors import POSITIVE, require
from seqtrain.memory import SavedBytes, checkpointed


@dataclass
class TbpttConfig:
    window: int = 128  # k2: steps of backpropagation per update
    stride: int | None = None  # k1: new steps per update; None = window (plain TBPTT)
    carry: bool = True  # carry the (detached) state across windows and batches; false = reset
    # awd-lstm-lm's variable windows: each update's length drawn around `window` (at most
    # window + 15), its LR scaled by length / window; plain TBPTT only (docs/awd.md)
    vary: bool = False

    def check(self) -> None:
        """tbptt.* on its own, one line per problem."""
        require(self.window > 0, "tbptt.window", self.window, POSITIVE)
        require(
            self.stride is None or 0 < self.stride <= self.window,
            "tbptt.stride",
            self.stride,
            f"must be in 1..tbptt.window ({self.window}), or null for stride = window",
        )
        if self.vary:  # awd-lstm-lm's variable windows (data.VariedSpans)
            require(
                self.stride in (None, self.window),
                "tbptt.stride",
                self.stride,
                "tbptt.vary=true draws each whole window (plain TBPTT): leave tbptt.stride null",
            )
            require(
                self.window >= 2 * VARY_MIN,
                "tbptt.window",
                self.window,
                f"tbptt.vary=true needs a window of at least {2 * VARY_MIN}: lengths are drawn "
                f"around window / 2 too, {VARY_SD} steps apart and at least {VARY_MIN}",
            )


class Objective(Protocol):
    """What the engine needs of a task (tasks.Task)."""

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed over the target elements of a segment."""
        ...


class Penalty(Protocol):
    """A regulariser of the model's outputs (model.ActivationPenalty), added to the objective."""

    def __call__(self, raw: Tensor, dropped: Tensor, previous: Tensor | None, steps: int) -> Tensor:
        """This segment's share of the window's penalty (raw, dropped (B, t, H); previous
        (B, 1, H) the raw output of the step before, or None; steps: the window's T)."""
        ...


class Pass(NamedTuple):
    """One run over a window."""

    loss: Tensor  # the task's loss summed over positions >= loss_from
    state: State | None  # the final state
    captured: State | None  # the state at capture_at (before the reset there)
    penalty: Tensor  # the penalty's mean over positions >= loss_from (0 unless asked for)


@dataclass
class UpdateResult:
    loss: float  # the task's loss, mean over the new positions' target elements
    tokens: int  # new positions trained on (B * k1)


class UpdateAbandoned(Exception):
    """A stop request (Engine.stop) met between two segments of an update, forward or backward:
    the update is dropped. Raised before the carried state, the history, the weights or the
    optimizer change (a new epoch's reset aside, which the replayed update repeats), so the loop
    state is still the last completed update's: a checkpoint saved now resumes exactly (the
    LightningModule catches it; callbacks.Preemption saves)."""


def detach(state: State | None) -> State | None:
    """Cut the graph and keep carried state in float32, whatever precision ran the window."""
    return None if state is None else tuple(s.detach().float() for s in state)


def reset(state: State | None, keep: Tensor) -> State | None:
    """Zero the state of the streams where keep is False; the others are untouched."""
    if state is None:
        return None
    # every state tensor is (num_layers, B, ...): a matrix state has more trailing dimensions
    return tuple(s * keep.to(s.dtype).view(1, -1, *[1] * (s.dim() - 2)) for s in state)


def segment_bounds(
    length: int, resets: Tensor | None, cuts: list[int], chunk: int | None
) -> list[int]:
    """Start positions of segments: every reset step, every forced cut, every chunk boundary.

    A fused kernel cannot zero one stream mid-sequence, so a window is run as segments that
    start wherever any stream resets; the state is masked between segments. A stack that resets
    inside (resets None here) needs no such cuts. Chunk boundaries count back from the end, so
    the last segment (never recomputed) is a whole chunk.
    """
    starts = {0, *cuts}
    if resets is not None:
        starts.update(torch.nonzero(resets.any(dim=0)).flatten().tolist())
    if chunk is not None:
        starts.update(range(length % chunk, length, chunk))
    return sorted(s for s in starts if 0 <= s < length)


class Engine:
    """Runs windows through a model, carrying state; one `train_update` = one optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        task: Objective,
        window: int,
        stride: int | None = None,
        carry: bool = True,
        chunk: int | None = None,
        penalty: Penalty | None = None,
        longest: int | None = None,
    ) -> None:
        stride = window if stride is None else stride
        if not 0 < stride <= window:
            raise ValueError(f"tbptt.stride={stride}: must be in 1..tbptt.window ({window})")
        self.model, self.task = model, task
        self.window, self.stride, self.carry = window, stride, carry
        self.chunk = chunk  # None: no checkpointing; else recompute every `chunk` steps in backward
        self.penalty = penalty  # on the model's outputs, training objective only
        self.longest = window if longest is None else longest  # the memory planner's T
        self.state: State | None = None  # detached state at the start of `history`
        self.history: tuple[Tensor, Tensor, Tensor] | None = None  # inputs, targets, resets
        self.eval_state: State | None = None
        self.saved_bytes = 0  # held for backward by the last train_update (memory.SavedBytes)
        # Asked between segments of a training update: true drops the update (UpdateAbandoned),
        # so a stop need not wait for a slow one to end. None: updates always run to the end.
        self.stop: Callable[[], bool] | None = None

    @property
    def history_length(self) -> int:
        return self.window - self.stride

    def _segment(
        self,
        x: Tensor,
        y: Tensor,
        resets: Tensor | None,
        state: State | None,
        with_loss: bool,
        previous: Tensor | None,
        steps: int | None,
    ):
        """(summed loss, penalty share, final state, last raw output) of one segment; steps is
        the window's trained length when the penalty is asked for, else None."""
        raw, h, state = self.model.layer_outputs(x, state, resets)  # (B, t, H) twice
        zero = h.new_zeros((), dtype=torch.float32)
        if not with_loss:
            return zero, zero, state, None
        outputs = self.model.predict(h)  # (B, t, V or K): lives only inside this segment
        loss = self.task.loss(outputs, y)
        if steps is None:
            return loss, zero, state, None
        last = raw[:, -1:].clone()  # (B, 1, H); a view would keep all of raw past a checkpoint
        return loss, self.penalty(raw, h, previous, steps), state, last

    def run(
        self,
        x: Tensor,
        y: Tensor,
        resets: Tensor,
        state: State | None,
        loss_from: int = 0,
        capture_at: int | None = None,
        chunk: int | None = None,
        penalize: bool = False,
    ) -> Pass:
        """Run (B, T[, F]) inputs from `state`: the summed loss over positions >= loss_from, the
        final state, the state at position `capture_at` (before the reset there) and, with
        `penalize` and a penalty, the penalty over positions >= loss_from."""
        cuts = [loss_from] + ([capture_at] if capture_at is not None else [])
        inside = getattr(self.model, "resets_inside", False)  # the stack resets streams itself
        bounds = segment_bounds(x.shape[1], None if inside else resets, cuts, chunk)
        total = x.new_zeros((), dtype=torch.float32)
        penalty = x.new_zeros((), dtype=torch.float32)
        steps = x.shape[1] - loss_from if penalize and self.penalty is not None else None
        captured, previous = None, None  # previous: the raw output before the segment (TAR)
        stoppable = self.stop is not None and torch.is_grad_enabled()  # training updates only
        for a, b in zip(bounds, [*bounds[1:], x.shape[1]], strict=True):
            if stoppable:
                self._stop_point(state)
            if a == capture_at:
                captured = state
            keep = ~resets[:, a]
            if not inside and state is not None and not bool(keep.all()):
                state = reset(state, keep)
            trained = a >= loss_from
            args = (x[:, a:b], y[:, a:b], resets[:, a:b] if inside else None, state, trained)
            args += (previous, steps if trained else None)
            # The last segment's backward runs first: recomputing it would save nothing.
            if chunk is not None and b < x.shape[1] and torch.is_grad_enabled():
                loss, share, state, previous = checkpointed(self._segment, *args)
            else:
                loss, share, state, previous = self._segment(*args)
            total, penalty = total + loss, penalty + share
        if capture_at is not None and capture_at >= x.shape[1]:
            captured = state
        return Pass(total, state, captured, penalty)

    def _stop_point(self, state: State | None) -> None:
        """Between segments: stop now if asked, and have backward ask again when it reaches
        this boundary (a hook on the state's gradient), where a slow update spends most time."""
        if self.stop():
            raise UpdateAbandoned
        if state is not None and state[0].requires_grad:
            state[0].register_hook(self._stop_in_backward)

    def _stop_in_backward(self, grad: Tensor) -> None:
        if self.stop():
            raise UpdateAbandoned  # out of backward(): some gradients are partly accumulated

    def train_update(self, window: Window, backward: Callable[[Tensor], None]) -> UpdateResult:
        """Forward history + new steps from the carried state, backward once, carry detached."""
        x, y, r = window.inputs, window.targets, window.resets
        if window.index == 0:  # a new epoch: history from the previous epoch is not context
            self.state, self.history = None, None
        if not self.carry:
            self.state = None
        if self.history is not None:
            hx, hy, hr = self.history
            x, y, r = torch.cat([hx, x], 1), torch.cat([hy, y], 1), torch.cat([hr, r], 1)
        new = window.inputs.shape[1]
        loss_from = x.shape[1] - new
        keep = min(self.history_length, x.shape[1])
        capture_at = x.shape[1] - keep
        batch = [*self.model.parameters(), x, y, r, *(self.state or ())]
        with SavedBytes(exclude=batch) as saved:
            out = self.run(x, y, r, self.state, loss_from, capture_at, self.chunk, penalize=True)
        self.saved_bytes = saved.bytes
        tokens = new * x.shape[0]
        # The task's loss: the mean over the new positions' targets only (B * k1, times K for
        # vector targets); history carries no loss. The objective adds the penalty, already a
        # mean over the same positions (ActivationPenalty's docstring); only the loss is reported.
        loss = out.loss / y[:, loss_from:].numel()
        backward(loss + out.penalty)
        self.state = detach(out.captured)  # with k1 == k2 this is the final state
        self.history = (
            (x[:, capture_at:], y[:, capture_at:], r[:, capture_at:]) if keep > 0 else None
        )
        return UpdateResult(loss=float(loss.detach()), tokens=tokens)

    @torch.no_grad()
    def eval_window(self, window: Window) -> tuple[float, int]:
        """Stateful evaluation: summed loss and target-element count; state carried across calls."""
        if window.index == 0:
            self.eval_state = None
        out = self.run(window.inputs, window.targets, window.resets, self.eval_state)
        self.eval_state = detach(out.state)
        return float(out.loss), window.targets.numel()

    def reset_state(self) -> None:
        """Forget the carried state and history (after a non-finite update)."""
        self.state, self.history = None, None

    def state_dict(self) -> dict:
        return {"state": self.state, "history": self.history}

    def load_state_dict(self, sd: dict) -> None:
        self.state, self.history = sd["state"], sd["history"]
