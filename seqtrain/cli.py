"""`python -m seqtrain` / `seqtrain`: Hydra composes conf/, seqtrain validates, train.run trains."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from seqtrain.config import ConfigError, check_overrides, validate
from seqtrain.data import DataError

log = logging.getLogger("seqtrain")


def conf_dir() -> Path:
    """conf/ ships inside the wheel (seqtrain/conf) and sits beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"seqtrain's conf/ directory is missing next to {here}")


CONF_DIR = conf_dir()


def fail(message: str) -> None:
    """One line and a non-zero exit; the traceback only when HYDRA_FULL_ERROR=1 asks for it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"seqtrain: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(raw: DictConfig) -> float:
    from seqtrain import train  # heavy imports (Lightning) only once the config is known good

    try:
        cfg = validate(raw)
    except ConfigError as err:
        fail(str(err))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train.run(cfg, run_dir)
    except (DataError, ConfigError) as err:
        fail(str(err))
    print(f"\nrun directory: {run_dir}")
    print(f"val/bpc: {summary['val_bpc']:.4f}  ({summary['tokens_per_s']:,.0f} tokens/s)")
    print(f"tensorboard --logdir {run_dir}")
    return summary["val_bpc"]  # the objective a Hydra sweeper minimises


def main() -> None:
    from hydra._internal.utils import get_args_parser

    try:
        check_overrides(get_args_parser().parse_args().overrides, CONF_DIR)
    except ConfigError as err:
        fail(str(err))
    hydra_main()
