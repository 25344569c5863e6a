"""``model.backend=fla``: Gated DeltaNet's recurrence through flash-linear-attention's Triton chunk
kernel (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``), on CUDA.

Only the recurrence changes: the projections, the short convolution, the gates, the norm and the
output are gdn.py's own modules, so the parameters are the modular backend's, name for name, and
a checkpoint moves between the two backends untouched. fla is imported here and nowhere else, at
the first window, so a machine without it builds and checks everything else.

Resets inside a window become fla's variable-length batches: every stream is cut at its resets and
the pieces are packed into one flat sequence with ``cu_seqlens`` (fla's own varlen API); the piece
that starts a window enters with the stream's carried state, every other piece with zeros, and
each stream's final state is its last piece's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

REQUIRES = "pip install -e '.[fla]' (flash-linear-attention)"
DEVICE = "cuda"  # the only device type fla's Triton kernels run on


def missing() -> str | None:
    """What this install lacks to run the kernel (checked at config time, without importing)."""
    absent = [name for name in ("fla", "triton") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(absent)}: {REQUIRES}" if absent else None


def kernel() -> Callable[..., tuple[Tensor, Tensor]]:
    """fla's chunk kernel, or one line saying why it cannot run here."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as err:
        raise RuntimeError(f"model.backend=fla needs {REQUIRES} ({err})") from None
    return chunk_gated_delta_rule


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor,
    S: Tensor,
    resets: Tensor | None,
    chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """gdn.delta_rule_chunkwise through fla's kernel: q (already scaled), k, v (B, N, T, d),
    beta, g (B, N, T) (g the log decay), S (B, N, d, d) the initial state, resets (B, T) bool or
    None -> o (B, N, T, d) and the final state (B, N, d, d). `chunk` is ignored: the kernel
    has its own (64 steps)."""
    if q.device.type != DEVICE:  # the config check refuses it first (cells.check_runnable)
        raise RuntimeError(
            f"model.backend=fla runs fla's Triton kernels, which need CUDA, not {q.device.type}: "
            "use model.backend=modular (the same parameters)"
        )
    run = kernel()
    q, k, v, beta, g = (t.transpose(1, 2) for t in (q, k, v, beta, g))  # fla's (B, T, N, ...)
    if resets is None:
        o, final = run(q, k, v, g, beta, scale=1.0, initial_state=S, output_final_state=True)
        return o.transpose(1, 2), final
    B, T = resets.shape
    starts = resets.clone()
    starts[:, 0] = True  # (B, T): where a piece starts
    first = starts.flatten().nonzero().squeeze(1)  # (P,): each piece's first step in B * T
    cu_seqlens = torch.cat([first, first.new_tensor([B * T])])  # (P + 1,)
    stream = first // T  # (P,): the stream each piece belongs to
    carries = (first % T == 0) & ~resets[:, 0][stream]  # a window's first piece, not reset there
    h0 = S[stream] * carries[:, None, None, None]  # (P, N, d, d)
    o, finals = run(
        *(t.flatten(0, 1)[None] for t in (q, k, v, g, beta)),  # (1, B * T, ...)
        scale=1.0,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )
    last = starts.sum(1).cumsum(0) - 1  # (B,): each stream's last piece
    return o[0].unflatten(0, (B, T)).transpose(1, 2), finals[last]
