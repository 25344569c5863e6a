"""Checkpoints that describe themselves: the config and the data spec (input kind and sizes) ride
inside the file, so a model and its task are rebuilt from the path alone (sampling, evaluation,
moving between backends).

hyper_parameters: {"config": Config as a dict, "spec": DataSpec as a dict}. Files of earlier
versions hold {"config", "vocab_size"} (byte LMs); `read` upgrades them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from seqtrain import cells
from seqtrain.config import Config, from_dict, to_dict
from seqtrain.data import DataSpec
from seqtrain.errors import CheckpointError, ConfigError, first_line
from seqtrain.model import RecurrentModel
from seqtrain.rundir import atomic_file
from seqtrain.tasks import Task, build_model, build_task

log = logging.getLogger("seqtrain")
# What training writes into every checkpoint; a file without them cannot be resumed from.
RESUME_KEYS = ("state_dict", "global_step", "optimizer_states", "seqtrain")


def read(path: str | Path) -> dict:
    """Load a checkpoint file as plain data (weights_only: no code runs from the file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        newest = p / "checkpoints" / "last.ckpt"
        hint = f"e.g. ckpt={newest}" if newest.is_file() else "a .ckpt file in it"
        raise CheckpointError(f"ckpt={path}: is a folder; name a checkpoint file: {hint}")
    if not p.is_file():
        raise CheckpointError(f"ckpt={path}: no such file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            raise CheckpointError(f"ckpt={path}: cannot read ({err.strerror})") from None
        raise CheckpointError(
            f"ckpt={path}: not a readable checkpoint (truncated, or not a PyTorch file); "
            "pass a complete one (resume=auto finds the newest in a run directory)"
        ) from None
    if not isinstance(ckpt, dict) or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(
            f"ckpt={path}: not a seqtrain checkpoint (no config inside); pass one written by "
            "python -m seqtrain"
        )
    if "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt={path}: holds no weights (state_dict missing)")
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


def check_device(device: str) -> None:
    """device=cuda on a machine without CUDA is one line, not torch's traceback."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"device={device}: choose from cpu, cuda, cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: this machine has no CUDA GPU; use device=cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device={device}: choose from cpu, cuda, cuda:N")


def spec_of(ckpt: dict) -> DataSpec:
    return DataSpec(**ckpt["hyper_parameters"]["spec"])


def task_of(ckpt: dict, cfg: Config) -> Task:
    """The run's task, on the data the run was trained on (its spec)."""
    return build_task(cfg.task, spec_of(ckpt))


def load_model(ckpt: dict, cfg: Config, device: str = "cpu") -> RecurrentModel:
    """Rebuild the model on `device` and load the weights evaluation reads: the training weights,
    or once a weight average has started (optim.average) its mean. A shape or vocabulary
    mismatch, or a backend that cannot run there (model.backend=fla off CUDA), is one line."""
    try:
        cells.check_runnable(cfg.model.backend, cfg.model.cell, torch.device(device).type)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model = build_model(cfg.model, task_of(ckpt, cfg))
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    weights.update((ckpt.get("seqtrain", {}).get("average") or {}).get("mean") or {})
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise CheckpointError(
            f"checkpoint weights do not fit the configured model: {detail}"
        ) from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"checkpoint weights {', '.join(bad)} hold NaN or infinite values; use an earlier "
            "checkpoint (a diverged run keeps its last good weights in nonfinite.ckpt)"
        )
    return model.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same directory, fsync, then rename over the target.

    A process killed at any moment, mid-save included, leaves either the previous complete file
    or the new complete file, never a truncated one.
    """

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_file(target) as f:  # a signal or kill mid-write: the old file stays
                torch.save(checkpoint, f)
        except Exception as err:
            raise CheckpointError(
                f"cannot write {target} ({write_failure(err, target.parent)}); "
                "the previous checkpoint there is kept"
            ) from err
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


def write_failure(err: Exception, directory: Path) -> str:
    """Why a write failed, in words: torch.save reports a full disk as a serialisation error."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "no space left on device"
    try:
        if shutil.disk_usage(directory).free < 2**20:
            return "no space left on device"
    except OSError:
        pass
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return first_line(err)


def resume_candidates(run_dir: Path) -> list[Path]:
    """The files resume=auto may continue from: last.ckpt (periodic, final, or written by a
    stop) and its versions. best.ckpt is the best validation so far, not where the run stopped,
    and nonfinite.ckpt is where it diverged: each is a resume point only when named."""
    return sorted((run_dir / "checkpoints").glob("last*.ckpt"))


def newest_complete(run_dir: Path) -> Path | None:
    """The most advanced complete last checkpoint in run_dir/checkpoints; None if the folder
    holds no checkpoint at all. One it cannot use is logged with the reason; when none can be
    used, CheckpointError names the file and the reason (resume never overwrites what it could
    not read)."""
    found, skipped = [], []
    for path in resume_candidates(run_dir):
        try:
            ckpt = read(path)
            missing = [k for k in RESUME_KEYS if k not in ckpt]
            if missing:
                raise CheckpointError(f"ckpt={path}: lacks {', '.join(missing)}")
            found.append((ckpt["global_step"], path.stat().st_mtime, path))
        except CheckpointError as err:
            skipped.append((path, str(err)))
    if found:
        for path, reason in skipped:
            log.warning("resume=auto: skipped %s: %s", path, reason)
        return max(found)[2]
    if skipped:
        path, reason = skipped[0]
        raise CheckpointError(
            f"resume=auto: {reason}; it is left as it is: fix it, name another with "
            "ckpt_path=..., or pass resume=fresh to start over"
        )
    others = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    if others:
        raise CheckpointError(
            f"resume=auto: {run_dir / 'checkpoints'} holds no last.ckpt (only "
            f"{', '.join(others)}); name one with ckpt_path=..., or pass resume=fresh"
        )
    return None


# Settings a resumed run must share with its checkpoint (dotted-key prefixes; docs/reliability.md
# has the table). data.* and tbptt.* (tbptt.vary's drawn windows included) lay out the streams
# and place the data cursor (the tokenizer's keys make other tokens); optim.lr, weight_decay and
# the optimizer's arguments are restored from the checkpoint's optimizer state, so a new value
# would be silently ignored; the restored weight average belongs to its optim.average rule; seed
# is replaced by the restored RNG states.
RESUME_FIXED = (
    "data.source",
    "data.path",
    "data.url",
    "data.sha256",
    "data.max_bytes",
    "data.batch_size",
    "data.split",
    "data.lag",
    "data.length",
    "data.target_path",
    "data.target_columns",
    "data.doc_starts_path",
    "data.tokenizer",  # the tokenizer's settings change the tokens (the run's own is restored)
    "data.vocab_size",
    "data.min_count",
    "data.tokenizer_file",
    "data.reader",
    "data.text_field",
    "data.dtype",
    "tbptt",
    "optim.lr",
    "optim.average",
    "optim.weight_decay",
    "optim.optimizer",
    "seed",
)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fixed_changes(saved: dict, current: dict) -> list[str]:
    """`key=saved (now current)` for each RESUME_FIXED setting that differs."""
    before, now = flat(upgrade(saved)), flat(current)
    for key in ("data.path", "data.doc_starts_path"):
        if isinstance(before.get(key), str):  # kept as typed by earlier versions
            before[key] = str(Path(before[key]).expanduser().resolve())
    keys = sorted(set(before) | set(now))
    fixed = [k for k in keys if any(k == p or k.startswith(p + ".") for p in RESUME_FIXED)]
    return [
        f"{k}={before.get(k)} (now {now.get(k)})"
        for k in fixed
        if k in before and before.get(k) != now.get(k)
    ]


def check_corpus(ckpt: dict, identity: str | None, path: str | Path, remedy: str) -> None:
    """Refuse a corpus whose identity (data.fingerprint) differs from the checkpoint's; a
    checkpoint of an earlier version has none, and passes."""
    saved = spec_of(ckpt).corpus
    if saved is not None and identity is not None and saved != identity:
        data = ckpt["hyper_parameters"]["config"].get("data", {})
        where = f"data.path={data['path']}" if data.get("path") else f"data.source={data['source']}"
        raise CheckpointError(
            f"ckpt={path} was trained on {where} as it was then ({short(saved)}); its content "
            f"has changed since ({short(identity)}); {remedy}"
        )


def short(identity: str) -> str:
    kind, _, digest = identity.partition(":")
    return f"{kind} {digest[:12]}"


def check_resumable(ckpt: dict, cfg: Config, spec: DataSpec, path: Path) -> None:
    """Refuse to resume into a different model or a different stream layout: the task, the
    data's kind and sizes, the RESUME_FIXED settings, the corpus's content and every model
    option but the backend must match."""
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
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"ckpt={path}: lacks {', '.join(missing)}; resume from a checkpoint written by "
            "training (sample and evaluate need only the weights)"
        )
    changed = fixed_changes(ckpt["hyper_parameters"]["config"], to_dict(cfg))
    if changed:
        raise CheckpointError(
            f"ckpt={path} was trained with {', '.join(changed)}; these fix the streams, the "
            "data cursor or restored state: resume with the checkpoint's values, or train "
            "anew in another hydra.run.dir"
        )
    check_corpus(
        ckpt,
        spec.corpus,
        path,
        "resume with the corpus it was trained on, or train anew in another hydra.run.dir",
    )
    # A key the checkpoint's version did not have yet (model.head, ...) had its default's effect.
    saved = {**to_dict(Config())["model"], **ckpt["hyper_parameters"]["config"]["model"]}
    current = to_dict(cfg)["model"]
    changed = [k for k in current if k != "backend" and saved[k] != current[k]]
    if changed:
        diffs = ", ".join(f"model.{k}={saved.get(k)} (now {current[k]})" for k in changed)
        raise CheckpointError(
            f"ckpt={path} was trained with {diffs}; resume with the same model options "
            "(only model.backend may change)"
        )
