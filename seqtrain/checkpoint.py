"""Checkpoints that describe themselves: the config and the data spec (input kind and sizes) ride
inside the file, so a model and its task are rebuilt from the path alone (sampling, evaluation,
moving between backends).

hyper_parameters: {"config": Config as a dict, "spec": DataSpec as a dict}. Files of earlier
versions hold {"config", "vocab_size"} (byte LMs); `read` upgrades them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from seqtrain.config import Config, from_dict, to_dict
from seqtrain.data import DataSpec
from seqtrain.errors import CheckpointError, ConfigError
from seqtrain.model import RecurrentModel
from seqtrain.tasks import Task, build_model, build_task


def read(path: str | Path) -> dict:
    """Load a checkpoint file as plain data (weights_only: no code runs from the file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"ckpt={path}: no such file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unpickling garbage can raise anything at all
        raise CheckpointError(
            f"ckpt={path}: not a readable checkpoint (truncated, or not a PyTorch file); "
            "pass a complete one (resume=auto finds the newest in a run directory)"
        ) from None
    if not isinstance(ckpt, dict) or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(
            f"ckpt={path}: not a seqtrain checkpoint (no config inside); pass one written by "
            "python -m seqtrain"
        )
    ckpt["hyper_parameters"] = upgrade_hyper_parameters(ckpt["hyper_parameters"])
    return ckpt


def upgrade_hyper_parameters(hparams: dict) -> dict:
    """Earlier checkpoints kept only the vocabulary size: a byte LM's spec."""
    if "spec" in hparams:
        return hparams
    vocab = hparams["vocab_size"]
    rest = {k: v for k, v in hparams.items() if k != "vocab_size"}
    return {**rest, "spec": {"kind": "tokens", "input_size": vocab, "target_size": vocab}}


def upgrade(config: dict) -> dict:
    """A config saved by an earlier seqtrain, in today's keys (data.synthetic=copy became
    data.source=copy)."""
    data = dict(config.get("data", {}))
    if "synthetic" in data:
        synthetic = data.pop("synthetic")
        data["source"] = synthetic or "text"
    return {**config, "data": data}


def config_of(ckpt: dict, overrides: dict | None = None) -> Config:
    """The run's config, with command-line overrides (e.g. model.backend=modular) applied."""
    merged = OmegaConf.merge(upgrade(ckpt["hyper_parameters"]["config"]), overrides or {})
    try:
        return from_dict(OmegaConf.to_container(merged))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def spec_of(ckpt: dict) -> DataSpec:
    return DataSpec(**ckpt["hyper_parameters"]["spec"])


def task_of(ckpt: dict, cfg: Config) -> Task:
    """The run's task, on the data the run was trained on (its spec)."""
    return build_task(cfg.task, spec_of(ckpt))


def load_model(ckpt: dict, cfg: Config) -> RecurrentModel:
    """Rebuild the model and load its weights; a shape or vocabulary mismatch is one line."""
    model = build_model(cfg.model, task_of(ckpt, cfg))
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same directory, fsync, then rename over the target.

    A process killed at any moment, mid-save included, leaves either the previous complete file
    or the new complete file, never a truncated one.
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from the group
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


def newest_complete(run_dir: Path) -> Path | None:
    """The most advanced checkpoint in run_dir/checkpoints that loads; None if there is none."""
    found = []
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        try:
            found.append((read(path)["global_step"], path.stat().st_mtime, path))
        except (CheckpointError, KeyError):
            continue
    return max(found)[2] if found else None


def check_resumable(ckpt: dict, cfg: Config, spec: DataSpec, path: Path) -> None:
    """Refuse to resume into a different model: the task, the data's kind and sizes and every
    model option but the backend must match."""
    saved_spec = spec_of(ckpt)
    shape = ("kind", "input_size", "target_size")
    if any(getattr(saved_spec, k) != getattr(spec, k) for k in shape):
        have = ", ".join(f"{k} {getattr(saved_spec, k)}" for k in shape)
        now = ", ".join(f"{k} {getattr(spec, k)}" for k in shape)
        raise CheckpointError(
            f"ckpt={path} was trained on data of {have}; this run's has {now}; "
            "resume with the same data (or it comes from another program or version)"
        )
    saved_task = ckpt["hyper_parameters"]["config"].get("task", {"name": "lm"})["name"]
    if saved_task != cfg.task.name:
        raise CheckpointError(
            f"ckpt={path} was trained with task.name={saved_task} (now {cfg.task.name}); "
            "resume with the same task"
        )
    saved = ckpt["hyper_parameters"]["config"]["model"]
    current = to_dict(cfg)["model"]
    changed = [k for k in current if k != "backend" and saved.get(k) != current[k]]
    if changed:
        diffs = ", ".join(f"model.{k}={saved.get(k)} (now {current[k]})" for k in changed)
        raise CheckpointError(
            f"ckpt={path} was trained with {diffs}; resume with the same model options "
            "(only model.backend may change)"
        )
