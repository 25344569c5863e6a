"""RecurrentModel: input layer -> recurrent stack (a named cell backend) -> head.

The task (tasks.py) decides the input layer and the head (for lm a token embedding and a head over
the vocabulary from heads.py, `model.head`, tied to the embedding with `model.tie_weights`; an input
projection and K outputs for regression); this file owns the stack and the dropout around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain import cells
from seqtrain.cells import State
from seqtrain.errors import POSITIVE, ConfigError, require
from seqtrain.heads import HEADS, AdaptiveOutputs

# Options that belong to the recurrent stack (handed to cells.build_recurrent as keywords).
CELL_OPTIONS = (
    "layernorm",
    "recurrent_dropout",
    "variational",
    "weight_drop",
    "zoneout",
    "forget_bias",
    "cell_clip",
    "peephole",
    "proj_size",
    "num_heads",
    "conv_size",
)


class Block(NamedTuple):
    """How model.block stacks the layers: a builder and its check, both with build_recurrent's
    arguments (the check raises a one-line ValueError)."""

    build: Callable[..., nn.Module]
    check: Callable[..., None]


BLOCKS = {
    "plain": Block(cells.build_recurrent, cells.check_options),
    "residual": Block(cells.build_residual, cells.check_residual),
}


@dataclass
class ModelConfig:
    backend: str = "cudnn"  # cell implementation: cudnn | jit | modular | compile | fla (gdn)
    cell: str = "lstm"  # lstm | gru | mingru | minlstm | rglru | module:Name (docs/cells.md)
    embedding_size: int = 64  # E: byte embeddings (few symbols need few dimensions), or inputs
    hidden_size: int = 512  # H: state size per layer
    num_layers: int = 1  # stacked recurrent layers (or residual blocks)
    # plain: the cells stacked; residual: per layer a pre-norm block (norm, a one-layer cell,
    # a gated MLP, residual adds), as scan cells are usually stacked: compare cells in one block
    block: str = "plain"
    dropout: float = 0.0  # between layers and on the output of the stack
    input_dropout: float = 0.0  # on the embeddings fed to the stack
    embedding_dropout: float = 0.0  # drops whole symbols' embedding rows (AWD-LSTM)
    variational: bool = False  # one dropout mask per sequence, constant over time ("locked")
    recurrent_dropout: float = 0.0  # on the hidden-to-hidden path
    weight_drop: float = 0.0  # DropConnect on weight_hh (AWD-LSTM)
    zoneout: float = 0.0  # keep previous h and c with this probability (expectation at eval)
    layernorm: bool = False  # layer-normalised cell (Ba et al. 2016)
    forget_bias: float = 0.0  # added to the forget-gate bias at init (TF uses 1.0)
    cell_clip: float | None = None  # clip the cell state to [-cell_clip, cell_clip]
    peephole: bool = False  # gates also see the cell state
    proj_size: int = 0  # project h to this size (nn.LSTM's proj_size); 0 = off
    # matrix-state cells (gdn, mlstm): heads, each with a (d, d) state, d = hidden_size / heads;
    # null = the cell's default (1)
    num_heads: int | None = None
    conv_size: int | None = None  # gdn: steps of its short causal convolution; null = 4
    # lm's output layer over the vocabulary (seqtrain/heads.py): linear (logits) | adaptive
    # (adaptive softmax over model.cutoffs: for large vocabularies)
    head: str = "linear"
    cutoffs: list[int] = field(default_factory=list)  # head=adaptive: where clusters start
    # the head shares the embedding matrix (Press & Wolf 2017); needs the head's input size
    # (model.proj_size, else model.hidden_size) = model.embedding_size
    tie_weights: bool = False
    # AWD-LSTM's activation regularisers on the last layer's output, training loss only
    # (docs/awd.md): ar * mean(dropped ** 2) and tar * mean((raw[t] - raw[t - 1]) ** 2)
    ar: float = 0.0  # activation regularisation (awd-lstm-lm's alpha, 2 there)
    tar: float = 0.0  # temporal activation regularisation, slowness (its beta, 1 there)

    def check(self) -> None:
        """model.* on its own, one line per problem. The cell options (recurrent dropout, zoneout,
        projection, clip, ...) are the chosen block's and cell's to check (cells.check_options):
        what a backend runs is theirs to say."""
        require(
            self.backend in cells.BACKENDS,
            "model.backend",
            self.backend,
            f"choose from {', '.join(cells.BACKENDS)}",
        )
        require(
            self.cell in cells.CELLS,
            "model.cell",
            self.cell,
            f"choose from {', '.join(cells.CELLS)}",
        )
        require(self.block in BLOCKS, "model.block", self.block, f"choose from {', '.join(BLOCKS)}")
        for key in ("embedding_size", "hidden_size", "num_layers"):
            require(getattr(self, key) > 0, f"model.{key}", getattr(self, key), POSITIVE)
        for key in ("dropout", "input_dropout", "embedding_dropout"):  # the model's own
            p = getattr(self, key)
            require(0.0 <= p < 1.0, f"model.{key}", p, "must be a probability in [0, 1)")
        require(
            0 <= self.proj_size < self.hidden_size,
            "model.proj_size",
            self.proj_size,
            f"must be 0 (off) or in 1..{self.hidden_size - 1} (below model.hidden_size)",
        )
        require(
            math.isfinite(self.forget_bias), "model.forget_bias", self.forget_bias, "must be finite"
        )
        heads = self.num_heads
        require(
            heads is None or (heads >= 1 and self.hidden_size % heads == 0),
            "model.num_heads",
            heads,
            f"must be at least 1 and divide model.hidden_size={self.hidden_size}",
        )
        require(
            self.conv_size is None or self.conv_size >= 1,
            "model.conv_size",
            self.conv_size,
            "must be at least 1, or null",
        )
        for key in ("ar", "tar"):
            weight = getattr(self, key)
            require(
                0 <= weight < math.inf, f"model.{key}", weight, "must be >= 0 and finite (0 = off)"
            )
        try:
            BLOCKS[self.block].check(
                self.backend, self.cell, self.num_layers, **self.cell_options()
            )
            check_head(self)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def cell_options(self) -> dict:
        options = {k: v for k, v in asdict(self).items() if k in CELL_OPTIONS}
        # Between-layer dropout exists only with 2+ layers; one layer still gets output dropout.
        options["dropout"] = self.dropout if self.num_layers > 1 else 0.0
        # The stack makes its own masks variational only where it drops something itself.
        options["variational"] = self.variational and (
            options["dropout"] > 0 or self.recurrent_dropout > 0
        )
        return options

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size


def check_head(cfg: ModelConfig) -> None:
    """model.head, model.cutoffs and model.tie_weights as far as they are known before the data
    is read (the task checks the cutoffs against the vocabulary): a one-line ValueError."""
    head = HEADS.get(cfg.head)
    head.check(cfg.cutoffs, cfg.output_size, None)
    if not cfg.tie_weights:
        return
    if not hasattr(head, "tie"):
        raise ValueError(
            f"model.tie_weights=true: model.head={cfg.head} has no single (V, E) matrix to share "
            "(its clusters project to narrower sizes); use model.head=linear or "
            "model.tie_weights=false"
        )
    E, H = cfg.embedding_size, cfg.output_size
    if H != E:
        given = f"model.proj_size={H}" if cfg.proj_size else f"model.hidden_size={H}"
        raise ValueError(
            f"model.tie_weights=true: the head's input ({given}) must equal "
            f"model.embedding_size={E}; set {_tie_fix(cfg)}"
        )


def _tie_fix(cfg: ModelConfig) -> str:
    """How to make the stack's output as wide as the embedding: a projection where the cell and
    backend have one (and E < H), else the embedding as wide as the output."""
    E = cfg.embedding_size
    if cfg.hidden_size > E:
        options = {**cfg.cell_options(), "proj_size": E}
        try:
            BLOCKS[cfg.block].check(cfg.backend, cfg.cell, cfg.num_layers, **options)
            return f"model.proj_size={E}"
        except ValueError:
            pass
    return f"model.embedding_size={cfg.output_size}"


def dropout(x: Tensor, p: float, variational: bool, training: bool) -> Tensor:
    """Plain dropout, or with variational=True one mask per sequence shared over time."""
    if not training or p == 0.0:
        return x
    if not variational:
        return F.dropout(x, p, True)
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)  # (B, 1, E)
    return x * mask


@dataclass(frozen=True)
class ActivationPenalty:
    """AR and TAR (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models").

    AR keeps the dropped outputs (what the head reads) small; TAR keeps the raw outputs (before
    the output dropout) slow-changing. Called once per segment of a window with that segment's
    outputs, it returns the segment's share of the window's penalty, so the shares add up to
    the window's means whatever the segments (chunk checkpoints, document cuts):
        ar * sum(dropped ** 2) / (B * T * H) + tar * sum(diff ** 2) / (B * (T - 1) * H)
    with T the window's trained steps and diff the T - 1 differences of consecutive raw outputs.
    `previous` is the raw output of the step before the segment, or None at the window's first
    step: as in awd-lstm-lm no pair spans two windows (the earlier one's graph is gone).
    """

    ar: float
    tar: float

    def __call__(self, raw: Tensor, dropped: Tensor, previous: Tensor | None, steps: int) -> Tensor:
        B, _, H = raw.shape  # (B, t, H); steps = T, the window's, of which t are here
        penalty = raw.new_zeros((), dtype=torch.float32)
        if self.ar:
            penalty = penalty + self.ar * dropped.float().square().sum() / (B * steps * H)
        if self.tar and steps > 1:
            seen = raw if previous is None else torch.cat([previous, raw], 1)  # (B, t[+1], H)
            diff = seen[:, 1:] - seen[:, :-1]  # (B, t or t - 1, H)
            penalty = penalty + self.tar * diff.float().square().sum() / (B * (steps - 1) * H)
        return penalty


def activation_penalty(cfg: ModelConfig) -> ActivationPenalty | None:
    """The penalty model.ar and model.tar ask for; None when both are 0 (nothing is computed)."""
    return ActivationPenalty(cfg.ar, cfg.tar) if cfg.ar or cfg.tar else None


class TokenEmbedding(nn.Embedding):
    """nn.Embedding whose rows, whole symbols, drop out in training (AWD-LSTM's embedding
    dropout): a dropped symbol reads as zeros everywhere in the batch."""

    def __init__(self, vocab_size: int, size: int, drop: float = 0.0) -> None:
        super().__init__(vocab_size, size)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight  # (V, E)
        if self.training and self.drop > 0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - self.drop) / (1 - self.drop)
            weight = weight * keep  # (V, E)
        return F.embedding(x, weight)  # (B, T, E)


class Outputs(NamedTuple):
    """The recurrent stack's last layer over a window (AR and TAR read both outputs)."""

    raw: Tensor  # (B, T, H) before the output dropout
    dropped: Tensor  # (B, T, H) after it: what the head reads
    state: State


class RecurrentModel(nn.Module):
    """`features` and `predict` are separate so the engine can run the head inside each
    checkpointed segment. Parameters: embedding.* (the input layer, whatever the task makes it),
    rnn.*, head.*; the byte LM's names are those of every earlier checkpoint. A tied head's
    weight is embedding.weight itself: parameters() lists it once, state_dict under both names."""

    def __init__(
        self,
        cfg: ModelConfig,
        input_layer: Callable[[ModelConfig], nn.Module],
        head: Callable[[ModelConfig, nn.Module], nn.Module],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # Built in this order (input layer, stack, head): the same seed gives the same weights.
        self.embedding = input_layer(cfg)  # (B, T[, F]) -> (B, T, E)
        self.rnn = BLOCKS[cfg.block].build(
            cfg.backend,
            cfg.cell,
            cfg.embedding_size,
            cfg.hidden_size,
            cfg.num_layers,
            **cfg.cell_options(),
        )
        self.head = head(cfg, self.embedding)  # (B, T, H) -> (B, T, V or K), or a head's outputs

    @property
    def resets_inside(self) -> bool:
        """Whether the stack drops a stream's state at its document starts itself (scan cells),
        given the window's resets; otherwise the engine cuts the window there."""
        return getattr(self.rnn, "resets_inside", False)

    def layer_outputs(
        self, x: Tensor, state: State | None = None, resets: Tensor | None = None
    ) -> Outputs:
        """The last layer's output before and after the output dropout, and the final state;
        resets (B, T) bool only for a stack with resets_inside."""
        e = dropout(self.embedding(x), self.cfg.input_dropout, self.cfg.variational, self.training)
        h, state = self.rnn(e, state) if resets is None else self.rnn(e, state, resets)  # (B, T, H)
        return Outputs(h, dropout(h, self.cfg.dropout, self.cfg.variational, self.training), state)

    def features(
        self, x: Tensor, state: State | None = None, resets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """What the head reads (the dropped output) and the final state."""
        out = self.layer_outputs(x, state, resets)
        return out.dropped, out.state

    def predict(self, h: Tensor) -> Tensor | AdaptiveOutputs:
        return self.head(h)  # (B, T, V or K) logits or outputs; adaptive: see heads.py

    def forward(
        self, x: Tensor, state: State | None = None
    ) -> tuple[Tensor | AdaptiveOutputs, State]:
        h, state = self.features(x, state)
        return self.predict(h), state
