"""Checkpoints that describe themselves: the config and vocabulary ride inside the file, so a model
is rebuilt from the path alone (sampling, evaluation, moving between backends)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from seqtrain.config import Config, ConfigError, from_dict
from seqtrain.model import RecurrentLM


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line that says why."""


def read(path: str | Path) -> dict:
    """Load a checkpoint file as plain data (weights_only: no code runs from the file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"ckpt={path}: no such file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"ckpt={path}: not a readable checkpoint (truncated?): {first}"
        ) from None
    if not isinstance(ckpt, dict) or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"ckpt={path}: not a seqtrain checkpoint (no config inside)")
    return ckpt


def config_of(ckpt: dict, overrides: dict | None = None) -> Config:
    """The run's config, with command-line overrides (e.g. model.backend=modular) applied."""
    merged = OmegaConf.merge(ckpt["hyper_parameters"]["config"], overrides or {})
    try:
        return from_dict(OmegaConf.to_container(merged))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def load_model(ckpt: dict, cfg: Config) -> RecurrentLM:
    """Rebuild the model and load its weights; a shape or vocabulary mismatch is one line."""
    model = RecurrentLM(cfg.model, ckpt["hyper_parameters"]["vocab_size"])
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise CheckpointError(
            f"checkpoint weights do not fit the configured model: {detail}"
        ) from None
    return model.eval()
