"""oneDNN's private ops behind one checked door, for the fused loops' matrix products.

On x86 CPUs in float32 nn.LSTM's own fused kernel runs its GEMMs through oneDNN, which is faster
there than torch.mm (MKL) for these shapes; these ops are how a Python loop reaches the same
GEMM: ``torch.ops.mkldnn._linear_pointwise`` (x W^T), ``_reorder_linear_weight`` (W packed once
per window into oneDNN's blocked layout: given a plain W, oneDNN reorders it inside every call),
and ``aten.mkldnn_linear_backward_weights`` with ``Tensor.to_mkldnn`` (the weight gradient read
straight from the (T*B, G*H) gate gradient, without the transposed copy torch.mm would need).

They are private and may change with any torch release. Each fast path is checked once per
process against its public equivalent (torch.mm) on a tiny input; a missing op, a changed
signature or a wrong result logs one warning, and the public path runs from then on: an upgrade
may cost speed, never a crash or a different result. The verdict is a dict lookup, and the
per-step products skip even that (a packed weight exists only after the checks passed).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("seqtrain.cells")

# Measured on x86 only; aarch64 builds route these ops through the Arm Compute Library.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")

# Fast path -> the private ops it calls, by attribute path from `torch`.
PRIVATE_OPS = {
    "gemm": ("ops.mkldnn._linear_pointwise",),
    "pack": ("ops.mkldnn._reorder_linear_weight",),
    "weight_grads": ("ops.aten.mkldnn_linear_backward_weights", "Tensor.to_mkldnn"),
}
_VERDICT: dict[str, bool] = {}  # fast path -> passed its check in this process
_OPS: dict[str, Any] = {}  # private op path -> the op, filled by the checks


def find(path: str) -> Any:
    """torch's attribute at `path`; tests replace this to simulate a torch without the op."""
    obj: Any = torch
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _probe(*shape: int) -> Tensor:
    """Fixed values from a private generator: the check must not move the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) + shape[0]))


def _expect(got: Tensor, want: Tensor) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ValueError(f"wrong result (max diff {(got - want).abs().max():.2e})")


def _check_gemm() -> None:
    x, w = _probe(3, 5), _probe(4, 5)
    _expect(_OPS["ops.mkldnn._linear_pointwise"](x, w, None, "none", [], ""), x.mm(w.t()))


def _check_pack() -> None:
    x, w = _probe(3, 5), _probe(4, 5)
    packed = _OPS["ops.mkldnn._reorder_linear_weight"](w, 3)
    _expect(mm_t(x, packed), x.mm(w.t()))


def _check_weight_grads() -> None:
    d, x = _probe(6, 4), _probe(6, 5)
    to_mkldnn = _OPS["Tensor.to_mkldnn"]
    dw, db = _OPS["ops.aten.mkldnn_linear_backward_weights"](
        to_mkldnn(d), to_mkldnn(x), d.new_empty((4, 5)), True
    )
    _expect(dw, d.t().mm(x))
    _expect(db, d.sum(0))


_CHECKS: dict[str, Callable[[], None]] = {
    "gemm": _check_gemm,
    "pack": _check_pack,
    "weight_grads": _check_weight_grads,
}


def verified(path: str) -> bool:
    """Whether fast path `path` passed its check; runs the check at the first question."""
    ok = _VERDICT.get(path)
    if ok is None:
        ok = _VERDICT[path] = _run_check(path)
    return ok


def _run_check(path: str) -> bool:
    if path != "gemm" and not verified("gemm"):
        return False  # packing and the backward are only used alongside oneDNN's GEMM
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            for op in PRIVATE_OPS[path]:
                _OPS[op] = find(op)
            _CHECKS[path]()
    except Exception as err:
        log.warning(
            "oneDNN fast path '%s' (%s) failed its check: %s: %s; using torch.mm from now on "
            "(slower, same results)",
            path,
            ", ".join(PRIVATE_OPS[path]),
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return False
    return True


def enabled() -> bool:
    """oneDNN's GEMM is available, switched on and checked: on x86 CPUs in float32 it runs."""
    return (
        _X86
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and verified("gemm")
    )


def on(x: Tensor) -> bool:
    """Use oneDNN for products with x: CPU, float32, enabled (the cheap tests first)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and enabled()


def mm_t(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) @ w (N, K)^T, both contiguous; w plain or packed by `pack`."""
    if w.is_mkldnn or on(x):  # the first test is the cheap one, for the per-step products
        return _OPS["ops.mkldnn._linear_pointwise"](x, w, None, "none", [], "")
    return x.mm(w.t())


# TorchScript cannot call oneDNN's op, so the jit loops call back into Python for it; it reads the
# signature from real types, not the strings `from __future__ import annotations` leaves.
mm_t.__annotations__ = {"x": Tensor, "w": Tensor, "return": Tensor}
mm_t = torch.jit.ignore(mm_t)


def pack(w: Tensor, rows: int) -> Tensor:
    """w (N, K) in oneDNN's blocked layout for mm_t's products with (rows, K) inputs: done once
    per window instead of inside every step's call."""
    if on(w) and verified("pack"):
        return _OPS["ops.mkldnn._reorder_linear_weight"](w, rows)
    return w


def input_grad(needed: bool, d: Tensor, w: Tensor, T: int, B: int) -> Tensor | None:
    """d (T*B, G) @ w (G, I) -> (T, B, I): a window input's gradient, None when not needed."""
    if not needed:
        return None
    dx = mm_t(d, w.t().contiguous()) if on(d) else d.mm(w)
    return dx.view(T, B, w.shape[1])


def linear_grads(d: Tensor, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """The weight gradients d^T x (G, K) of each input x (N, K), and the bias gradient d.sum(0),
    for a gradient d (N, G) of x W^T + b, N = T*B.

    On CPU this is oneDNN's inner-product backward, the one nn.Linear's oneDNN path runs: it reads
    d as it is. A transposed copy of d for mm_t took as long as the product itself (the rows are
    a power of two floats long), and torch.mm's transposed product is slower still.
    """
    if not (on(d) and d.shape[0] > 0 and verified("weight_grads")):
        return [d.t().mm(x) for x in xs], d.sum(0)
    to_mkldnn = _OPS["Tensor.to_mkldnn"]
    dm = to_mkldnn(d)
    grads = [
        # Only the shape of the third argument (the weight) is read.
        _OPS["ops.aten.mkldnn_linear_backward_weights"](
            dm, to_mkldnn(x), d.new_empty((d.shape[1], x.shape[1])), k == 0
        )
        for k, x in enumerate(xs)
    ]
    return [g[0] for g in grads], grads[0][1]
