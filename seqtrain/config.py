"""The configuration schema and its validation.

Hydra composes YAML from conf/; this module checks the result against dataclasses (types and
key names) and against the rules that tie values together, so a typo or an impossible value is a
one-line error before any work starts. Each group's dataclass lives in the file that uses it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seqtrain import optim, threads, trainer_extras
from seqtrain.data import DataConfig
from seqtrain.errors import POSITIVE, ConfigError, require
from seqtrain.memory import MemoryConfig
from seqtrain.model import ModelConfig
from seqtrain.optim import OptimConfig
from seqtrain.tasks import TaskConfig
from seqtrain.tbptt import TbpttConfig
from seqtrain.trainer_extras import tensorboard

PRECISIONS = ("32-true", "bf16-mixed")
# No ddp_spawn: the run's state (carried state, summary) would stay in the spawned workers.
STRATEGIES = ("auto", "ddp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
RESUME = ("auto", "fresh")  # fresh: start from step 0 even over a run's checkpoints


@dataclass
class TrainerConfig:
    max_steps: int = 2000  # optimizer updates
    val_check_interval: int = 500  # validate (over the whole val split) every this many updates
    accelerator: str = "auto"  # cpu | gpu | auto (Lightning)
    devices: int = 1  # devices (processes) per node; > 1 trains with DDP, B streams per device
    num_nodes: int = 1  # nodes (SLURM: one task per device on each node)
    strategy: str = "auto"  # auto | ddp (auto picks ddp when devices x num_nodes > 1)
    # DDP: seconds a rank waits for the others (at start-up and in every collective) before the
    # run fails in one line; a peer that never starts would otherwise block for torch's 30 min
    ddp_timeout: float = 600.0
    precision: str = "32-true"  # 32-true | bf16-mixed (carried state stays float32)
    log_every_n_steps: int = 10  # TensorBoard scalar interval
    # A progress bar on stderr; without one, plain progress lines in the log (nohup, SLURM, pipes).
    progress_bar: bool | None = None  # None: the bar only when stderr is a terminal
    progress_every: int = 100  # without the bar: a progress line every this many updates,
    progress_seconds: float = 60.0  # or after this many seconds, whichever comes first
    sample_length: int = 300  # tokens generated at each validation (bytes for bytes; 0 = none)
    checkpoint_every: int = 100  # write checkpoints/last.ckpt every this many updates
    # CPU threads per process: auto = the CPUs this process may use, shared among the sweep
    # jobs or ranks this host runs at once (an OMP_NUM_THREADS in the environment wins); or N
    threads: str = "auto"
    # Any other lightning.Trainer argument, given as +trainer.NAME=VALUE (e.g. deterministic);
    # validate() moves them here and refuses those seqtrain owns (trainer_extras.REFUSED).
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """trainer.* on its own, one line per problem (the extra Trainer arguments: validate)."""
        for key in ("max_steps", "val_check_interval", "devices", "num_nodes"):
            require(getattr(self, key) > 0, f"trainer.{key}", getattr(self, key), POSITIVE)
        for key, choices in (
            ("accelerator", ACCELERATORS),
            ("strategy", STRATEGIES),
            ("precision", PRECISIONS),
        ):
            value = getattr(self, key)
            require(value in choices, f"trainer.{key}", value, f"choose from {', '.join(choices)}")
        require(
            math.isfinite(self.ddp_timeout) and self.ddp_timeout > 0,
            "trainer.ddp_timeout",
            self.ddp_timeout,
            "must be a finite number of seconds > 0",
        )
        for key in ("log_every_n_steps", "progress_every", "checkpoint_every"):
            require(getattr(self, key) > 0, f"trainer.{key}", getattr(self, key), POSITIVE)
        seconds = self.progress_seconds
        require(seconds > 0, "trainer.progress_seconds", seconds, "must be > 0")
        try:
            threads.parse(self.threads)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        require(
            self.sample_length >= 0, "trainer.sample_length", self.sample_length, "must be >= 0"
        )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tbptt: TbpttConfig = field(default_factory=TbpttConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)  # what a window is trained for (tasks.py)
    seed: int = 1234  # seeds torch, numpy and python; same seed + config = same losses on CPU
    ckpt_path: str | None = None  # resume exactly from this checkpoint
    resume: str | None = None  # auto: resume from the newest complete checkpoint in the run dir
    # Lightning loggers by name (logger=tensorboard | csv | [tensorboard,csv]), each writing
    # under the run directory; an option file gives this node whole.
    logger: dict[str, Any] = field(default_factory=tensorboard)
    # Lightning callbacks by name, on top of seqtrain's own: +callbacks.NAME._target_=CLASS.
    callbacks: dict[str, Any] = field(default_factory=dict)


# Nodes an option file gives whole (Hydra merges, so optim=sgd would otherwise keep AdamW's
# betas): the registered schema leaves them empty, and validate() replaces rather than merges.
WHOLE_NODES = (("optim", "optimizer"), ("logger",))


def schema(raw: dict | None = None) -> DictConfig:
    """Config's schema and defaults, with the whole nodes that `raw` gives (all if None) emptied.

    Registered as `seqtrain_schema` in Hydra's ConfigStore: conf/train.yaml's defaults list
    starts with it, so the YAML files hold only what each option changes.
    """
    node = OmegaConf.structured(Config)
    for path in WHOLE_NODES:
        given = raw
        for key in path:
            given = given.get(key) if isinstance(given, dict) else None
        if raw is None or given is not None:
            OmegaConf.update(node, ".".join(path), {}, merge=False)
    return node


ConfigStore.instance().store(name="seqtrain_schema", node=schema())


def group_keys(group: str) -> list[str]:
    """Field names of a config group ([] for a top-level scalar such as seed)."""
    factory = Config.__dataclass_fields__[group].default_factory
    return (
        [f.name for f in dataclasses.fields(factory)] if dataclasses.is_dataclass(factory) else []
    )


def unknown_key(full_key: str) -> ConfigError:
    group, _, rest = full_key.partition(".")
    if rest.count(".") >= 1 and rest.split(".")[0] in group_keys(group):
        # Inside a dict node (optim.optimizer, ...): its keys are whatever its class takes.
        return ConfigError(f"{full_key} is not set here; add the argument with +{full_key}=...")
    if group in Config.__dataclass_fields__ and "." in full_key:
        return ConfigError(
            f"{full_key} is not a key; '{group}' takes: {', '.join(group_keys(group))}"
        )
    top = ", ".join(Config.__dataclass_fields__)
    return ConfigError(f"{full_key} is not a key; the top level takes: {top}")


def validate(raw: DictConfig | dict, saved: bool = False) -> Config:
    """Typed, checked config; raises ConfigError with one line naming the key.

    saved: a checkpoint's config (`from_dict`). It was checked when its run started, and the files
    its tokenizer settings name belong to that machine: the tokenizer itself is in the checkpoint.
    """
    raw = OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else dict(raw)
    trainer = dict(raw.get("trainer") or {})
    known = TrainerConfig.__dataclass_fields__
    extra = {k: trainer.pop(k) for k in list(trainer) if k not in known}
    trainer["extra"] = {**trainer.get("extra", {}), **extra}
    raw = {**raw, "trainer": trainer}
    try:
        merged = OmegaConf.merge(schema(raw), raw)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = err.full_key or "config"
        if "not in" in str(err) or "Key '" in str(err):
            raise unknown_key(key) from None
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    # Each group checks its own keys; what ties groups together is checked here.
    cfg.data.check(saved)
    cfg.task.check()
    cfg.model.check()
    cfg.tbptt.check()
    cfg.memory.check()
    cfg.trainer.check()
    require(cfg.resume in (None, *RESUME), "resume", cfg.resume, f"choose from {', '.join(RESUME)}")
    require(
        cfg.resume is None or cfg.ckpt_path is None,
        "resume",
        cfg.resume,
        f"give either resume={cfg.resume} or ckpt_path=PATH, not both",
    )
    require(0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be in 0..2**32-1 (numpy's range)")
    # Last: these import the classes the config names (Lightning, torch.optim).
    cfg.optim.check(training=not saved)
    trainer_extras.check_trainer_args(cfg.trainer.extra)
    trainer_extras.check(cfg.logger, cfg.callbacks)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain containers, for checkpoints and logs."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """A config saved in a checkpoint (optim keys of earlier versions upgraded), checked."""
    if "optim" in d:
        d = {**d, "optim": optim.upgrade(d["optim"])}
    return validate(d, saved=True)
