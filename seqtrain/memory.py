"""Memory: checkpointing over time chunks, activation accounting, and a budget -> chunk planner.

The engine (tbptt.py) cuts a window into segments; with a chunk length set it runs every segment
but the last under `checkpointed`, so only the states at segment boundaries outlive the forward
pass and each segment is recomputed, one at a time, during backward. The last segment is not
checkpointed: its backward runs first, so recomputing it would redo work for no memory gain.

Two numbers describe one update's memory, and both are measured on every device:
    saved bytes   what autograd holds for backward when the forward ends (saved_tensors_hooks,
                  each storage once; parameters and the batch itself not counted);
    peak bytes    the high-water mark of memory allocated during forward + backward, above what
                  was allocated when the update began (torch.cuda.max_memory_allocated on CUDA,
                  the profiler's memory events on CPU). Weights, optimizer state and the batch are
                  outside it; the parameter gradients made by the backward are inside it.

The planner predicts both for every chunk length from the shapes, calibrates the per-step term
with one measured probe update, and picks the plan with the least recomputation whose predicted
peak fits `memory.budget`:
    saved(c) = n(c) * S + m(c) * a
    peak(c)  = K + n(c) * S + m(c) * p
with S the bytes of one boundary state (exact, from the shapes), n(c) = ceil(T / c) - 1 kept
boundaries, m(c) = min(c, T) + 1 states in the longest (and the last) segment (fused kernels keep
the start state with the steps), K the parameter gradients and backward scratch, a and p the
saved and peak bytes per step (the shape model's, then the probe's).
Recomputation is T - m(c) steps, so the longest chunk that fits recomputes least.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seqtrain.errors import POSITIVE, ConfigError, require
from seqtrain.profiling import cpu_peak_bytes

log = logging.getLogger(__name__)

CHECKPOINT_MODES = ("none", "chunk", "auto")
HEADROOM = 0.03  # the planner aims this fraction under the budget, for the model's error


@dataclass
class MemoryConfig:
    checkpoint: str = "none"  # none | chunk (recompute every `chunk` steps) | auto (pick the chunk)
    chunk: int | None = None  # steps per recomputed segment (checkpoint=chunk)
    budget: str | None = None  # peak bytes of one update, e.g. 512MiB; auto fits the chunk to it
    probe: bool = True  # measure one update before training and print predicted vs measured
    host_cache: bool = True  # keep freed CPU memory in the process for reuse (glibc; see below)

    def check(self) -> None:
        """memory.* on its own, one line per problem."""
        require(
            self.checkpoint in CHECKPOINT_MODES,
            "memory.checkpoint",
            self.checkpoint,
            f"choose from {', '.join(CHECKPOINT_MODES)}",
        )
        require(
            self.checkpoint != "chunk" or (self.chunk is not None and self.chunk > 0),
            "memory.chunk",
            self.chunk,
            "memory.checkpoint=chunk needs a positive chunk length",
        )
        require(self.chunk is None or self.chunk > 0, "memory.chunk", self.chunk, POSITIVE)
        if self.budget is not None:
            try:
                parse_size(self.budget)
            except ValueError as err:
                raise ConfigError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Host memory
# ---------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def cache_host_memory() -> bool:
    """Keep freed CPU memory in the process for the next tensor, as PyTorch's CUDA allocator does.

    glibc serves each large block with a fresh mmap and returns it to the OS on free, so every
    big tensor of every update is page-faulted and zeroed again: an elementwise op into fresh
    memory costs several times one into reused memory. The price is a higher resident size (the
    process keeps its high-water mark); docs/memory.md#host-memory-cache has the measured trade.
    Process-wide and permanent; returns whether it applied (it needs glibc), and says so if not.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        # Older glibc caps the mmap threshold at 32 MiB; blocks above it are still mmapped.
        mapped = any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in (1 << 30, 32 << 20))
        applied = mapped and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        applied = False
    if not applied:
        log.warning("memory.host_cache=true has no effect here: it needs glibc's mallopt")
    return applied


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int, key: str = "memory.budget") -> int:
    """'512MiB' -> 536870912; SI (kB, MB, GB) and binary (KiB, MiB, GiB) units, any case."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{key}={text}: not a size; write a number and a unit, e.g. 512MiB or 2GB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{key}={text}: must be more than 0 bytes")
    return size


def format_size(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plan_chunk(cfg: MemoryConfig, window: int) -> int | None:
    """Steps per checkpointed segment before any measurement, or None for no checkpointing.

    `auto` takes ceil(sqrt(window)): it keeps sqrt(T) boundary states plus one segment's
    activations, near the minimum of T/c + c, for about one extra forward of recomputation.
    With a budget the planner (`plan_memory`) replaces this guess once it has measured.
    """
    if cfg.checkpoint == "none":
        return None
    if cfg.checkpoint == "chunk":
        return cfg.chunk
    return math.ceil(math.sqrt(window))


# ---------------------------------------------------------------------------------------------
# Checkpointing and accounting
# ---------------------------------------------------------------------------------------------

_ACTIVE: list[SavedBytes] = []  # the innermost accounting context sees checkpoint inputs


def checkpointed(fn: Callable, *args: object) -> object:
    """fn(*args), recomputed in backward instead of keeping what it saves.

    Non-reentrant (the PyTorch default going forward), with the RNG state stashed and restored so
    dropout and zoneout masks replay identically. A checkpoint keeps its tensor inputs alive for
    the recomputation; they are counted as saved bytes here, since autograd's hooks never see them.
    """
    if _ACTIVE:
        _ACTIVE[-1].keep(*(a for a in args if isinstance(a, Tensor)))
        for a in args:  # the state is a tuple of tensors
            if isinstance(a, tuple):
                _ACTIVE[-1].keep(*(t for t in a if isinstance(t, Tensor)))
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


class SavedBytes:
    """Counts the bytes autograd saves for backward inside the block, each storage once.

    Storages of `exclude` (parameters, the batch, the carried state: memory that exists whether
    or not this update runs) are not counted. Inside a checkpointed segment the checkpoint's own
    hooks take over, so what a checkpoint discards is, correctly, not counted either.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.excluded = {_storage_key(t) for t in exclude}
        self.storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def keep(self, *tensors: Tensor) -> None:
        for t in tensors:
            key = _storage_key(t)
            if key not in self.excluded:
                self.storages[key] = t.untyped_storage().nbytes()

    def _pack(self, t: Tensor) -> Tensor:
        self.keep(t)
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)


def _storage_key(t: Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _unpack(t: Tensor) -> Tensor:
    return t


def measure_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the high-water mark while fn runs, above what was allocated before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


# ---------------------------------------------------------------------------------------------
# Measuring one update
# ---------------------------------------------------------------------------------------------


@dataclass
class Usage:
    saved_bytes: int
    peak_bytes: int
    seconds: float  # wall time of the measured update (the CPU profiler adds a little)


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """A probe must not change the random stream training will see."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


class Task(Protocol):
    def random_batch(
        self, batch: int, steps: int, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]: ...


class Pass(Protocol):
    loss: Tensor
    penalty: Tensor


class Runner(Protocol):
    """What the planner measures: tbptt.Engine (typed here by what is read, since tbptt imports
    this module). `longest` is the longest window an update gets."""

    model: nn.Module
    task: Task
    longest: int

    def run(
        self, x: Tensor, y: Tensor, resets: Tensor, state: tuple[Tensor, ...] | None, **kw: object
    ) -> Pass: ...


def measure_update(
    engine: Runner,
    batch_size: int,
    window: int,
    chunk: int | None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> Usage:
    """Run one forward + backward of a (batch_size, window) update with `chunk`, measured.

    Random inputs of the task's kind (engine.task.random_batch), a zero start state and no resets:
    memory depends on shapes, not on the data. The
    model's gradients and the RNG state are restored afterwards, the optimizer is not touched.
    """
    model: nn.Module = engine.model
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(0)
    x, y = engine.task.random_batch(batch_size, window, g)  # (B, T[, F]), (B, T[, K])
    resets = torch.zeros(batch_size, window, dtype=torch.bool, device=device)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    saved = SavedBytes(exclude=[*params, x, y, resets])

    def update() -> None:
        with autocast or contextlib.nullcontext(), saved:
            out = engine.run(x, y, resets, None, chunk=chunk, penalize=True)
        (out.loss / x.numel() + out.penalty).backward()

    with _rng_kept(device):
        start = time.perf_counter()
        peak = measure_peak(update, device)
        seconds = time.perf_counter() - start
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return Usage(saved.bytes, peak, seconds)


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------


def head_elements_per_step(head: nn.Module, batch: int) -> tuple[int, int]:
    """(saved, peak) elements per time step of the head and its loss: the head's own estimate
    (heads.py's `elements_per_step`), else its outputs (an nn.Linear's out_features) twice kept
    and twice again at the peak, an estimate the probe corrects."""
    if hasattr(head, "elements_per_step"):
        return head.elements_per_step(batch)
    outputs = batch * getattr(head, "out_features", 0)
    return 2 * outputs, 4 * outputs


@dataclass
class MemoryModel:
    """Predicted saved and peak bytes of one update of T steps, for any chunk length."""

    window: int  # T
    state_bytes: int  # S: one boundary state, all layers (exact)
    grad_bytes: int  # G: the parameter gradients the backward allocates (exact)
    fixed_bytes: float  # K: peak bytes that do not grow with the segment (G, backward scratch)
    step_saved: float  # a: saved bytes per step of a kept segment
    step_peak: float  # p: peak bytes per step of the live segment (saved + backward transients)

    @classmethod
    def from_shapes(cls, model: nn.Module, batch_size: int, window: int) -> MemoryModel:
        """What backprop needs per step: the recurrent stack's own estimate (inputs, gates, cell
        and hidden states of every layer: cells.Shapes.activation_elements_per_step) and the
        head's input, twice at the peak (their gradients are the backward's transients), plus
        the head and its loss (`head_elements_per_step`): at a large vocabulary the (B, V)
        log-softmax and its gradients, not the stack, fill the memory. Kernels keep more
        (oneDNN's and cuDNN's workspaces) or less: the probe corrects the per-step terms."""
        rnn, f = model.rnn, next(model.parameters()).element_size()
        stack = rnn.activation_elements_per_step(batch_size) + batch_size * rnn.output_size
        head_saved, head_peak = head_elements_per_step(model.head, batch_size)
        step_saved, step_peak = f * (stack + head_saved), f * (2 * stack + head_peak)
        state = f * sum(math.prod(shape) for shape in rnn.state_shapes(batch_size))
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        # scratch: gradients a segment's backward makes before adding them to the accumulated
        # ones; a layer's weights twice (oneDNN's buffers) and the largest other matrix, which at
        # a large vocabulary is the head's or the embedding's (V, H)
        sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
        layer = max(sizes.pop(id(p)) for p in rnn.parameters())
        scratch = 2 * layer + max(sizes.values(), default=0)
        return cls(window, state, grads, float(grads + scratch), step_saved, step_peak)

    def segments(self, chunk: int | None) -> tuple[int, int]:
        """(kept boundary states, states in the longest segment: its steps + its start)."""
        if chunk is None or chunk >= self.window:
            return 0, self.window + 1
        return math.ceil(self.window / chunk) - 1, chunk + 1

    def saved(self, chunk: int | None) -> float:
        n, m = self.segments(chunk)
        return n * self.state_bytes + m * self.step_saved

    def peak(self, chunk: int | None) -> float:
        n, m = self.segments(chunk)
        return self.fixed_bytes + n * self.state_bytes + m * self.step_peak

    def recompute(self, chunk: int | None) -> float:
        """Fraction of the forward that runs twice: every segment but the last."""
        _, m = self.segments(chunk)
        return (self.window - m + 1) / self.window

    def calibrated(self, measured: dict[int | None, Usage]) -> MemoryModel:
        """The per-step terms fitted to measured updates: one measurement sets a and p (K stays
        the shapes' estimate), two with different segment lengths set K and p as well."""
        points = sorted({self.segments(c)[1]: (c, u) for c, u in measured.items()}.items())
        m, (c, usage) = points[-1]
        n = self.segments(c)[0]
        step_saved = max(0.0, (usage.saved_bytes - n * self.state_bytes) / m)
        fixed = self.fixed_bytes
        if len(points) >= 2:  # the two longest segments measured: a line through both
            m0, (c0, u0) = points[-2]
            y0 = u0.peak_bytes - self.segments(c0)[0] * self.state_bytes
            y1 = usage.peak_bytes - n * self.state_bytes
            fixed = max(float(self.grad_bytes), y1 - (y1 - y0) / (m - m0) * m)
        step_peak = max(step_saved, (usage.peak_bytes - fixed - n * self.state_bytes) / m)
        return MemoryModel(
            self.window, self.state_bytes, self.grad_bytes, fixed, step_saved, step_peak
        )

    def minimum(self) -> int:
        """The chunk length with the smallest predicted peak."""
        return min(range(1, self.window + 1), key=self.peak)

    def fit(self, budget: int, exclude: Iterable[int | None] = ()) -> int | None:
        """The longest chunk (least recomputation) whose predicted peak fits, skipping chunks
        measured not to; None when no checkpointing fits. Raises ValueError stating the minimum
        when nothing fits. Aims 3% under the budget where it can: a margin for model error."""
        exclude = set(exclude)
        for target in (int(budget * (1 - HEADROOM)), budget):
            if None not in exclude and self.peak(None) <= target:
                return None
            feasible = [
                c for c in range(1, self.window) if c not in exclude and self.peak(c) <= target
            ]
            if feasible:
                return max(feasible)
        best = self.minimum()
        raise ValueError(
            f"memory.budget={format_size(budget)} is below the minimum of "
            f"{format_size(self.peak(best))} for this model, batch and window (chunk {best}); "
            "raise it, or lower data.batch_size or tbptt.window"
        )


@dataclass
class Plan:
    """What the run keeps to; goes into summary.json."""

    checkpoint: str  # the mode asked for
    chunk: int | None  # steps per recomputed segment; None = no checkpointing
    recompute: float  # fraction of the forward run twice
    budget_bytes: int | None
    predicted_saved_bytes: int  # before this plan was measured
    predicted_peak_bytes: int
    saved_bytes: int | None  # measured on a probe update (None: memory.probe=false)
    peak_bytes: int | None
    probes: int  # measured updates the planner ran

    def as_dict(self) -> dict:
        return asdict(self)


def _describe(chunk: int | None) -> str:
    return "no checkpointing" if chunk is None else f"chunk {chunk}"


def plan_memory(
    cfg: MemoryConfig,
    engine: Runner,
    batch_size: int,
    autocast: contextlib.AbstractContextManager | None = None,
    say: Callable[[str], None] = log.info,
    measured: dict[int | None, Usage] | None = None,
) -> Plan:
    """Choose the chunk, measure it and say predicted vs measured; the caller runs the plan.

    Without a budget the chunk is `plan_chunk`'s and one probe measures it (memory.probe). With
    a budget and checkpoint=auto: a probe at ceil(sqrt(T)) calibrates the model, the longest
    chunk predicted to fit is measured, the model is refitted through both measurements and, if
    it now predicts a longer chunk fits, that one is measured too (at most four probes). The
    longest measured chunk within the budget wins. With a budget and a fixed plan (none, chunk)
    the plan is measured and must fit. Nothing fits: ValueError stating the minimum.
    `measured` holds (and receives) updates of this engine's shape already measured, by chunk.
    """
    T = engine.longest  # the longest window an update gets (tbptt.vary draws some above window)
    budget = parse_size(cfg.budget) if cfg.budget is not None else None
    model = MemoryModel.from_shapes(engine.model, batch_size, T)
    measured = {} if measured is None else measured
    predicted: dict[int | None, tuple[float, float]] = {}  # (saved, peak) before measuring

    def measure(chunk: int | None, model: MemoryModel) -> Usage:
        """One update at `chunk`, measured once; `model`'s prediction for it kept beside it."""
        if chunk not in measured:
            predicted[chunk] = (model.saved(chunk), model.peak(chunk))
            measured[chunk] = measure_update(engine, batch_size, T, chunk, autocast)
        return measured[chunk]

    chunk = plan_chunk(cfg, T)
    if budget is not None and cfg.checkpoint == "auto":
        chunk, model = _search(cfg.budget, budget, model, batch_size, measure, measured, say)
    elif cfg.probe or budget is not None:
        usage = measure(chunk, model)
        if budget is not None and usage.peak_bytes > budget:
            raise ValueError(
                f"memory.budget={cfg.budget}: {_describe(chunk)} needs a peak of "
                f"{format_size(usage.peak_bytes)}; use memory.checkpoint=auto or a smaller chunk"
            )
    usage = measured.get(chunk)
    saved, peak = predicted.get(chunk, (model.saved(chunk), model.peak(chunk)))
    plan = Plan(
        checkpoint=cfg.checkpoint,
        chunk=chunk,
        recompute=round(model.recompute(chunk), 4),
        budget_bytes=budget,
        predicted_saved_bytes=round(saved),
        predicted_peak_bytes=round(peak),
        saved_bytes=usage.saved_bytes if usage else None,
        peak_bytes=usage.peak_bytes if usage else None,
        probes=len(measured),
    )
    if usage is not None:
        say(_described(plan))
    return plan


def _search(
    given: str,
    budget: int,
    model: MemoryModel,
    batch_size: int,
    measure: Callable[[int | None, MemoryModel], Usage],
    measured: dict[int | None, Usage],
    say: Callable[[str], None],
) -> tuple[int | None, MemoryModel]:
    """memory.checkpoint=auto under a budget: probe at ceil(sqrt(T)), calibrate, measure the
    longest chunk predicted to fit, recalibrate (at most four probes in all); the longest
    measured chunk within the budget, and the calibrated model. Nothing fits: ValueError."""
    T = model.window
    probe = math.ceil(math.sqrt(T))
    usage = measure(probe, model)
    say(
        f"memory probe at chunk {probe} (T={T}, B={batch_size}): saved "
        f"{format_size(usage.saved_bytes)}, peak {format_size(usage.peak_bytes)} "
        f"(shape model {format_size(model.saved(probe))}, {format_size(model.peak(probe))})"
    )
    model = model.calibrated(measured)
    fits = [c for c, u in measured.items() if u.peak_bytes <= budget]
    for _ in range(3):
        chunk = model.fit(budget, exclude=[c for c in measured if c not in fits])
        if chunk in measured:
            break
        usage = measure(chunk, model)
        say(
            f"memory: {_describe(chunk)} predicted peak {format_size(model.peak(chunk))}, "
            f"measured {format_size(usage.peak_bytes)}"
        )
        if usage.peak_bytes <= budget:
            fits.append(chunk)
        model = model.calibrated(measured)
    if not fits:
        smallest = min(u.peak_bytes for u in measured.values())
        raise ValueError(
            f"memory.budget={given} ({budget:,} bytes): every plan measured exceeds it "
            f"(the smallest peak: {smallest:,} bytes); raise it"
        )
    return max(fits, key=lambda c: T if c is None else c), model  # the least recomputation


def _described(plan: Plan) -> str:
    """The plan's log line. Without a budget the shape model chose nothing, so its uncalibrated
    guess (on CPU far off, docs/memory.md) is not printed as a plan; summary.json keeps it."""
    chunk = _describe(plan.chunk)
    if plan.budget_bytes is None:
        return (
            f"memory: {chunk}, recomputes {plan.recompute:.0%} of the forward; one update "
            f"measured: saved {format_size(plan.saved_bytes)}, peak {format_size(plan.peak_bytes)}"
        )
    return (
        f"memory plan: {chunk}, recomputes {plan.recompute:.0%} of the forward; saved "
        f"{format_size(plan.predicted_saved_bytes)} predicted, {format_size(plan.saved_bytes)} "
        f"measured; peak {format_size(plan.predicted_peak_bytes)} predicted, "
        f"{format_size(plan.peak_bytes)} measured (budget {format_size(plan.budget_bytes)})"
    )


class PeakMeter:
    """Peak bytes of the block above its start, from CUDA's allocator counters (cheap enough for
    every update); `bytes` stays None on CPU, where only a profiled probe can tell."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self) -> PeakMeter:
        if self.device.type == "cuda":
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
