"""nn.RNNBase's private flat weight list, behind a check against the named parameters.

The cudnn backend's weight-drop hands ``torch.lstm`` / ``torch.gru`` a list of weights with one
entry replaced by a dropped copy. ``_flat_weights`` (with ``_flat_weights_names``) is the list
nn.LSTM itself passes, kept in sync on ``.to()`` and ``flatten_parameters()``; it is private. It
is checked once per process against the public parameters in the order nn.LSTM documents
(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr per layer); if the names or the tensors
differ, one warning is logged and the list is built from the named parameters from then on.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

log = logging.getLogger("seqtrain.cells")

_VERDICT: dict[str, bool] = {}  # "flat_weights" -> the private list matched the public one


def public_names(module: nn.RNNBase) -> list[str]:
    """The weights torch.lstm / torch.gru take, in their order (one direction)."""
    kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
    kinds += ["weight_hr"] if getattr(module, "proj_size", 0) else []
    return [f"{kind}_l{k}" for k in range(module.num_layers) for kind in kinds]


def private(module: nn.RNNBase) -> tuple[list[Tensor], list[str]]:
    """The private list and its names (tests replace this to simulate another torch)."""
    return list(module._flat_weights), list(module._flat_weights_names)


def _check(module: nn.RNNBase, names: list[str]) -> bool:
    try:
        weights, private_names = private(module)
        if private_names != names:
            raise ValueError(f"names {private_names} != {names}")
        if any(w is not getattr(module, n) for w, n in zip(weights, names, strict=True)):
            raise ValueError("tensors are not the named parameters")
    except Exception as err:
        log.warning(
            "nn.RNNBase._flat_weights failed its check (%s: %s); building the weight list from "
            "the named parameters from now on",
            type(err).__name__,
            err,
        )
        return False
    return True


def flat_weights(module: nn.RNNBase) -> tuple[list[Tensor], list[str]]:
    """(weights, names) in torch.lstm's order, as a new list the caller may edit."""
    names = public_names(module)
    ok = _VERDICT.get("flat_weights")
    if ok is None:
        ok = _VERDICT["flat_weights"] = _check(module, names)
    if ok:
        return private(module)[0], names
    return [getattr(module, n) for n in names], names
