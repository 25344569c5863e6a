"""Output layers over a vocabulary, chosen by `model.head`: (B, T, H) features -> what the LM's loss
and sampling read.

    linear    nn.Linear(H, V): logits. `model.tie_weights` makes its (V, H) matrix the input
              embedding's own (V, E) one (Press & Wolf 2017; AWD-LSTM), so H must equal E.
    adaptive  nn.AdaptiveLogSoftmaxWithLoss(H, V, model.cutoffs) (Grave et al. 2017): the first
              cutoffs[0] symbols and one entry per cluster in a full-width head, the rarer ones in
              clusters behind narrower projections (H / 4, H / 16, ...). Its forward returns
              `AdaptiveOutputs`: the loss computes only each target's own cluster, and is the exact
              NLL of the head's distribution; `log_prob` gives that whole distribution (sampling).

A head's forward returns either a logits tensor (B, T, V) or an object with `nll(targets)` and
`log_prob()`; `nll` and `scores` below read both, so a new head is one registration here and
nothing in the task or the engine changes. Each registration also says what it costs per step
(`elements_per_step`, read by the memory model) and checks its options in one line (`check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("model.head")


def nll(outputs: Tensor | AdaptiveOutputs, targets: Tensor) -> Tensor:
    """Negative log-likelihood of (B, T) targets, summed: cross-entropy of logits, or the head's own
    loss for a head that makes no logits."""
    if isinstance(outputs, Tensor):  # (B, T, V) logits
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="sum")
    return outputs.nll(targets)


def scores(outputs: Tensor | AdaptiveOutputs) -> Tensor:
    """(B, T, V) log-probabilities up to a constant per position (softmax gives the distribution):
    logits as they are, or the head's full log_prob."""
    return outputs if isinstance(outputs, Tensor) else outputs.log_prob()


def _choice_error(cutoffs: Sequence[int], problem: str) -> ValueError:
    return ValueError(f"model.cutoffs={list(cutoffs)}: {problem}")


@HEADS.register("linear")
class LinearHead(nn.Linear):
    """(B, T, H) -> (B, T, V) logits; parameters `weight` (V, H) and `bias` (V,), as nn.Linear."""

    def __init__(self, features: int, vocab: int, cutoffs: Sequence[int] = ()) -> None:
        super().__init__(features, vocab)

    @staticmethod
    def check(cutoffs: Sequence[int], features: int, vocab: int | None) -> None:
        """One line for options this head does not take (vocab None: not known yet)."""
        if cutoffs:
            raise _choice_error(cutoffs, "model.head=linear takes none; use model.head=adaptive")

    def tie(self, weight: nn.Parameter) -> None:
        """Share `weight` (V, E), the embedding's matrix, as this head's: one tensor, trained by
        both uses. It starts as this head's init (uniform, +-1/sqrt(E)) rather than the
        embedding's N(0, 1), whose logits would start with a spread of sqrt(E)."""
        if weight.shape != self.weight.shape:
            raise ValueError(
                f"model.tie_weights=true: the embedding is {tuple(weight.shape)}, the head "
                f"{tuple(self.weight.shape)}; they must match"
            )
        with torch.no_grad():
            weight.copy_(self.weight)
        self.weight = weight

    def elements_per_step(self, batch: int) -> tuple[int, int]:
        """(saved, peak) elements per time step: cross-entropy keeps the (B, V) log-softmax for
        backward; at the peak it is there with its gradient and the logits' gradient."""
        V = self.out_features
        return batch * V, 3 * batch * V


@dataclass
class AdaptiveOutputs:
    """What an adaptive head returns: the features, and the head that reads them with targets
    (loss) or without (the full distribution)."""

    features: Tensor  # (B, T, H)
    head: AdaptiveHead

    def nll(self, targets: Tensor) -> Tensor:
        return self.head.nll(self.features, targets)

    def log_prob(self) -> Tensor:
        return self.head.full_log_prob(self.features)


@HEADS.register("adaptive")
class AdaptiveHead(nn.AdaptiveLogSoftmaxWithLoss):
    """nn.AdaptiveLogSoftmaxWithLoss (div_value 4, no head bias) whose forward returns
    AdaptiveOutputs, so the engine's `loss(model.predict(h), targets)` stays as for logits. It
    computes in float32 whatever the autocast (its loss writes float32 log-probabilities into a
    buffer of the features' type)."""

    def __init__(self, features: int, vocab: int, cutoffs: Sequence[int]) -> None:
        super().__init__(features, vocab, list(cutoffs))

    @staticmethod
    def check(cutoffs: Sequence[int], features: int, vocab: int | None) -> None:
        """Strictly increasing, > 0 and < V, and every cluster's projection at least 1 wide."""
        if not cutoffs:
            raise _choice_error(cutoffs, "model.head=adaptive needs one or more, e.g. [2000,10000]")
        if any(b <= a for a, b in zip(cutoffs, cutoffs[1:], strict=False)) or cutoffs[0] <= 0:
            raise _choice_error(cutoffs, "must be strictly increasing and > 0")
        if vocab is not None and cutoffs[-1] >= vocab:
            raise _choice_error(
                cutoffs, f"must be < the vocabulary size {vocab} (every cluster holds a symbol)"
            )
        narrowest = features // 4 ** len(cutoffs)  # nn.AdaptiveLogSoftmaxWithLoss's div_value
        if narrowest < 1:
            raise _choice_error(
                cutoffs,
                f"{len(cutoffs)} clusters need a head input of at least {4 ** len(cutoffs)} "
                f"(each projects to 1/4 of the one before; it is {features}); use fewer cutoffs",
            )

    def forward(self, h: Tensor) -> AdaptiveOutputs:  # type: ignore[override]
        return AdaptiveOutputs(h, self)

    def nll(self, h: Tensor, targets: Tensor) -> Tensor:
        """Summed NLL of (B, T) targets: each row's head entry plus its cluster's, only."""
        with torch.autocast(h.device.type, enabled=False):
            out = super().forward(h.flatten(0, 1).float(), targets.flatten())  # (B*T,) log-probs
        return -out.output.sum()

    def full_log_prob(self, h: Tensor) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return self.log_prob(h.flatten(0, 1).float()).view(*h.shape[:-1], -1)  # (B, T, V)

    def elements_per_step(self, batch: int) -> tuple[int, int]:
        """(saved, peak) elements per time step, for targets drawn uniformly over the vocabulary
        as the memory probe draws them: the head's log-softmax for every row, and for the rows of
        cluster i (a fraction size_i / V) its input, projection and log-softmax; at the peak,
        the gradients of one of them (backward takes one cluster at a time). Text, where most
        targets fall in the head, needs less."""
        V, H = self.n_classes, self.in_features
        saved, largest = float(self.head_size), float(self.head_size)
        bounds = zip(self.cutoffs, self.cutoffs[1:], strict=False)
        for cluster, (a, b) in zip(self.tail, bounds, strict=True):
            rows, width = (b - a) / V, cluster[0].out_features
            saved += rows * (H + width + (b - a))
            largest = max(largest, rows * (b - a))
        return math.ceil(batch * saved), math.ceil(batch * (saved + 2 * largest))
