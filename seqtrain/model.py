"""RecurrentLM: embedding -> recurrent stack (a named cell backend) -> linear head."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain import cells
from seqtrain.tbptt import State

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
)


@dataclass
class ModelConfig:
    backend: str = "cudnn"  # cell implementation: cudnn | jit | modular | compile
    cell: str = "lstm"  # lstm | gru
    embedding_size: int = 64  # byte embeddings: 256 symbols need few dimensions
    hidden_size: int = 512  # H: state size per layer
    num_layers: int = 1  # stacked recurrent layers
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


def dropout(x: Tensor, p: float, variational: bool, training: bool) -> Tensor:
    """Plain dropout, or with variational=True one mask per sequence shared over time."""
    if not training or p == 0.0:
        return x
    if not variational:
        return F.dropout(x, p, True)
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)  # (B, 1, E)
    return x * mask


class RecurrentLM(nn.Module):
    """Byte-level language model; `features` and `logits` are separate so the engine can run
    the head inside each checkpointed segment."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        self.rnn = cells.build_recurrent(
            cfg.backend,
            cfg.cell,
            cfg.embedding_size,
            cfg.hidden_size,
            cfg.num_layers,
            **cfg.cell_options(),
        )
        self.head = nn.Linear(cfg.output_size, vocab_size)

    def embed(self, x: Tensor) -> Tensor:
        weight = self.embedding.weight  # (V, E)
        p = self.cfg.embedding_dropout
        if self.training and p > 0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p) / (1 - p)  # (V, 1)
            weight = weight * keep
        return F.embedding(x, weight)  # (B, T, E)

    def features(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        e = dropout(self.embed(x), self.cfg.input_dropout, self.cfg.variational, self.training)
        h, state = self.rnn(e, state)  # (B, T, H)
        return dropout(h, self.cfg.dropout, self.cfg.variational, self.training), state

    def logits(self, h: Tensor) -> Tensor:
        return self.head(h)  # (B, T, V)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h, state = self.features(x, state)
        return self.logits(h), state

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample `length` tokens after a (T0,) prompt; returns the (length,) new tokens."""
        logits, state = self(prompt.view(1, -1))  # (1, T0, V)
        out = []
        for _ in range(length):
            step = logits[0, -1].float() / max(temperature, 1e-6)  # (V,)
            if top_k is not None:
                kth = torch.topk(step, top_k).values[-1]
                step = step.masked_fill(step < kth, float("-inf"))
            token = torch.multinomial(F.softmax(step, -1), 1, generator=generator)  # (1,)
            out.append(token)
            logits, state = self(token.view(1, 1), state)
        return torch.cat(out)
