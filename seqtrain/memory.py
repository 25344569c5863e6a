"""Memory: gradient checkpointing over time chunks, and how long a chunk is."""

from __future__ import annotations

import math
from dataclasses import dataclass

CHECKPOINT_MODES = ("none", "chunk", "auto")


@dataclass
class MemoryConfig:
    checkpoint: str = "none"  # none | chunk (recompute every `chunk` steps) | auto (pick the chunk)
    chunk: int | None = None  # steps per recomputed segment (checkpoint=chunk)


def plan_chunk(cfg: MemoryConfig, window: int) -> int | None:
    """Steps per checkpointed segment, or None for no checkpointing.

    `auto` takes ceil(sqrt(window)): it keeps sqrt(T) boundary states plus one segment's
    activations, the minimum of T/c + c, for one extra forward of recomputation.
    """
    if cfg.checkpoint == "none":
        return None
    if cfg.checkpoint == "chunk":
        return cfg.chunk
    return math.ceil(math.sqrt(window))
