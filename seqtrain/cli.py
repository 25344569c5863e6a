"""`python -m seqtrain` / `seqtrain`: Hydra composes conf/, seqtrain validates, train.run trains."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from seqtrain.config import check_overrides, validate
from seqtrain.errors import ConfigError, SeqtrainError

log = logging.getLogger("seqtrain")


def conf_dir() -> Path:
    """conf/ ships inside the wheel (seqtrain/conf) and sits beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"seqtrain's conf/ directory is missing next to {here}")


CONF_DIR = conf_dir()


def parse_key_values(argv: list[str], schema: type, passthrough: tuple[str, ...] = ()) -> tuple:
    """key=value arguments for the checkpoint tools (sample, evaluate), checked against a
    dataclass. Keys under a `passthrough` prefix (e.g. `model.`) are returned as config overrides.
    Values stay verbatim, so prompt="def " keeps its space."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    known, overrides = {}, {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"{arg!r}: arguments are key=value; keys: {', '.join(fields)}")
        if key.split(".")[0] in passthrough:
            overrides[key] = value
        elif key in fields:
            known[key] = None if value in ("null", "None") else value
        else:
            allowed = ", ".join([*fields, *(f"{p}.*" for p in passthrough)])
            raise ConfigError(f"{key} is not a key; this command takes: {allowed}")
    try:
        args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), known))
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required: {err.full_key}=...") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}") from None
    return args, OmegaConf.to_container(
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()])
    )


def fail(message: str) -> None:
    """One line and a non-zero exit; the traceback only when HYDRA_FULL_ERROR=1 asks for it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"seqtrain: error: {message}", file=sys.stderr)
    sys.exit(2)


def record_config(raw: DictConfig, run_dir: Path) -> None:
    """Hydra's .hydra/ record, written only once the run is known to start (hydra.output_subdir
    is null so that a refused run leaves an earlier run's record untouched)."""
    record = run_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.get()
    OmegaConf.save(raw, record / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), record / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")


def resume_command(run_dir: Path) -> str:
    overrides = [
        o
        for o in HydraConfig.get().overrides.task
        if not o.startswith(("resume=", "ckpt_path=", "hydra.run.dir="))
    ]
    return " ".join(["python -m seqtrain", *overrides, "resume=auto", f"hydra.run.dir={run_dir}"])


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(raw: DictConfig) -> float:
    from lightning.pytorch.utilities import rank_zero_only

    from seqtrain import train  # heavy imports (Lightning) only once the config is known good

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        job = train.prepare(validate(raw), run_dir)
    except SeqtrainError as err:
        fail(str(err))
    # Under DDP every rank runs this function; one of them speaks and writes the record.
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    if rank_zero:
        record_config(raw, run_dir)
    try:
        summary = train.fit(job)
    except SeqtrainError as err:
        fail(str(err))
    if "stopped_by" in summary:
        stopped, step, ckpt = summary["stopped_by"], summary["steps"], summary["checkpoint"]
        if rank_zero:
            print(f"\n{stopped}: stopped after step {step}; saved {ckpt}")
            print(f"resume with: {resume_command(run_dir)}")
        sys.exit(128 + int(getattr(signal, stopped)))  # as if the signal had killed it
    objective = summary[summary["monitor"].replace("/", "_")]  # the task's primary figure
    if rank_zero:
        print(f"\nrun directory: {run_dir}")
        print(f"{summary['monitor']}: {objective:.4f}  ({summary['tokens_per_s']:,.0f} tokens/s)")
        print(f"tensorboard --logdir {run_dir}")
    return objective  # what a Hydra sweeper minimises: val/bpc for lm, val/nmse for regression


def main() -> None:
    from hydra._internal.utils import get_args_parser

    try:
        check_overrides(get_args_parser().parse_args().overrides, CONF_DIR)
    except ConfigError as err:
        fail(str(err))
    hydra_main()
