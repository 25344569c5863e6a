"""Pre-norm residual blocks around any recurrent core: `model.block=residual`.

Scan cells (minGRU, minLSTM, RG-LRU) are usually stacked this way (Griffin, the minGRU paper's
language models): each block is x + core(norm(x)), then + mlp(norm(.)), so comparing a scan cell
with an LSTM is fair only inside the same block. The core is a one-layer stack from the cell
registry, any cell and backend; the block knows nothing about which.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.cells.base import State
from seqtrain.cells.compiled import CompiledStep, tensor_key

EXPANSION = 3  # the gated MLP's hidden width over the block width (Griffin's)


class GatedMLP(nn.Module):
    """GeGLU: W_out (gelu(W_gate x) * W_up x), hidden = expansion * width."""

    def __init__(self, width: int, expansion: int = EXPANSION) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * expansion * width)  # rows gate, up
        self.down = nn.Linear(expansion * width, width)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)  # (B, T, expansion * width) each
        return self.down(F.gelu(gate) * up)


class ResidualBlock(nn.Module):
    """x + drop(core(norm(x))), then + mlp(norm(.)); RMSNorm, as Griffin.

    `core` is any module with seqtrain's forward contract, width -> width: ``core(x, state) ->
    (y, state)``. ``resets`` is passed on only when given (cores without it still work)."""

    def __init__(
        self,
        core: nn.Module,
        width: int,
        expansion: int = EXPANSION,
        dropout: float = 0.0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.core = core
        self.norm_core = nn.RMSNorm(width)
        self.norm_mlp = nn.RMSNorm(width)
        self.mlp = GatedMLP(width, expansion)
        self.dropout = dropout  # on the core's branch: model.dropout "between layers"
        self.fused = fused  # the norms, the MLP's gate and the adds through torch.compile

    def forward(
        self, x: Tensor, state: State | None = None, resets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        kwargs = {} if resets is None else {"resets": resets}
        before, after = (_fused_before, _fused_after) if self.fused else (_before, _after)
        y, state = self.core(before(self, x), state, **kwargs)  # (B, T, width)
        return after(self, x, F.dropout(y, self.dropout, self.training)), state


def _before(block: ResidualBlock, x: Tensor) -> Tensor:
    """The core's input: norm(x)."""
    return block.norm_core(x)


def _after(block: ResidualBlock, x: Tensor, y: Tensor) -> Tensor:
    """The block's work after its core: x + y, then + mlp(norm(.))."""
    x = x + y
    return x + block.mlp(block.norm_mlp(x))


_BEFORE = CompiledStep(_before, "residual block's input norm")
_AFTER = CompiledStep(_after, "residual block's adds, norm and MLP")


def _fused_before(block: ResidualBlock, x: Tensor) -> Tensor:
    """`_before` compiled (inductor fuses the norm's passes), one graph per shape and mode."""
    return _BEFORE.get(tensor_key(x))(block, x)


def _fused_after(block: ResidualBlock, x: Tensor, y: Tensor) -> Tensor:
    """`_after` compiled: the adds, the norm and the GeGLU's elementwise work fused around the
    MLP's two GEMMs."""
    return _AFTER.get(tensor_key(x, y))(block, x, y)


class ResidualStack(nn.Module):
    """An input projection (when the input is not `width` wide), `ResidualBlock`s in sequence,
    then a final RMSNorm (the residual stream grows with depth).

    The state concatenates the blocks' states along the layer dimension, so it keeps the stack
    contract: each tensor (num_layers, B, H). The memory planner's interface is the cores'."""

    def __init__(self, input_size: int, blocks: list[ResidualBlock], width: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(input_size, width) if input_size != width else None
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.RMSNorm(width)
        core = blocks[0].core  # a registry stack, or any module with the forward contract
        self.input_size, self.output_size, self.num_layers = input_size, width, len(blocks)
        self.num_states = getattr(core, "num_states", None)
        self.resets_inside = getattr(core, "resets_inside", False)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Each state tensor's shape: the blocks' (1, B, ...) stacked on the layer dimension."""
        cores = [b.core.state_shapes(batch) for b in self.blocks]
        per_state = zip(*cores, strict=True)
        return [(sum(s[0] for s in shapes), batch, *shapes[0][2:]) for shapes in per_state]

    def activation_elements_per_step(self, batch: int) -> int:
        """The cores' own count, plus per block the two norms' inputs, the MLP's input, its
        gate and up halves and their product: an estimate the probe corrects."""
        cores = sum(b.core.activation_elements_per_step(batch) for b in self.blocks)
        width, expansion = self.output_size, self.blocks[0].mlp.down.in_features // self.output_size
        return cores + self.num_layers * batch * width * (3 + 3 * expansion)

    def forward(
        self, x: Tensor, state: State | None = None, resets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        if self.proj_in is not None:
            x = self.proj_in(x)  # (B, T, width)
        n = len(self.blocks)
        per_block = (
            [None] * n if state is None else list(zip(*(s.chunk(n) for s in state), strict=True))
        )
        finals = []
        for block, s in zip(self.blocks, per_block, strict=True):
            x, s = block(x, None if s is None else tuple(s), resets)  # (B, T, width)
            finals.append(s)
        return self.norm_out(x), tuple(torch.cat(parts) for parts in zip(*finals, strict=True))


def residual_stack(
    make_core: Callable[[], nn.Module],
    input_size: int,
    width: int,
    num_layers: int,
    expansion: int = EXPANSION,
    dropout: float = 0.0,
    fused: bool = False,
) -> ResidualStack:
    """`num_layers` residual blocks around fresh cores, ``make_core() -> module`` width -> width;
    `fused` compiles each block's work around its core (model.backend=compile)."""
    blocks = [
        ResidualBlock(make_core(), width, expansion, dropout, fused) for _ in range(num_layers)
    ]
    return ResidualStack(input_size, blocks, width)
