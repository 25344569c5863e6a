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

from seqtrain import cells, corpora, optim, synthetic, threads, trainer_extras
from seqtrain.data import (
    READERS,
    SOURCES,
    TOKEN_DTYPES,
    VARY_MIN,
    VARY_SD,
    DataConfig,
    names_token_array,
)
from seqtrain.errors import ConfigError
from seqtrain.memory import CHECKPOINT_MODES, MemoryConfig, parse_size
from seqtrain.model import BLOCKS, ModelConfig, check_head
from seqtrain.optim import OptimConfig
from seqtrain.tasks import TASKS, TaskConfig
from seqtrain.tbptt import TbpttConfig
from seqtrain.tokenizers import TOKENIZERS
from seqtrain.trainer_extras import tensorboard

assert "copy" in SOURCES, synthetic  # importing synthetic registers the generated corpora
assert "jsonl" in READERS, corpora  # and corpora the readers of JSON Lines and token arrays
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


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {allowed}")


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
    d, m, t, mem, o, tr = cfg.data, cfg.model, cfg.tbptt, cfg.memory, cfg.optim, cfg.trainer
    _require(d.source in SOURCES, "data.source", d.source, f"choose from {', '.join(SOURCES)}")
    positive = "must be a positive integer"
    _require(
        cfg.task.name in TASKS,
        "task.name",
        cfg.task.name,
        f"choose from {', '.join(TASKS)}, or name your own as module:Name",
    )
    _require(d.batch_size > 0, "data.batch_size", d.batch_size, positive)
    _require(d.eval_batch_size > 0, "data.eval_batch_size", d.eval_batch_size, positive)
    _require(d.max_bytes is None or d.max_bytes > 0, "data.max_bytes", d.max_bytes, positive)
    if not saved:
        check_tokenizer(d)
    _require(
        d.reader is None or d.reader in READERS,
        "data.reader",
        d.reader,
        f"choose from {', '.join(READERS)}, or name your own as module:function",
    )
    _require(
        d.dtype in TOKEN_DTYPES, "data.dtype", d.dtype, f"choose from {', '.join(TOKEN_DTYPES)}"
    )
    _require(d.vocab_size is None or d.vocab_size > 0, "data.vocab_size", d.vocab_size, positive)
    _require(
        len(d.split) == 3 and all(0 < f < math.inf for f in d.split),
        "data.split",
        d.split,
        "must be three positive fractions [train, val, test]",
    )
    _require(
        m.backend in cells.BACKENDS,
        "model.backend",
        m.backend,
        f"choose from {', '.join(cells.BACKENDS)}",
    )
    _require(m.cell in cells.CELLS, "model.cell", m.cell, f"choose from {', '.join(cells.CELLS)}")
    _require(m.block in BLOCKS, "model.block", m.block, f"choose from {', '.join(BLOCKS)}")
    for key in ("embedding_size", "hidden_size", "num_layers"):
        _require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), positive)
    for key in (
        "dropout",
        "input_dropout",
        "embedding_dropout",
        "recurrent_dropout",
        "weight_drop",
        "zoneout",
    ):
        p = getattr(m, key)
        _require(0.0 <= p < 1.0, f"model.{key}", p, "must be a probability in [0, 1)")
    _require(
        0 <= m.proj_size < m.hidden_size,
        "model.proj_size",
        m.proj_size,
        f"must be 0 (off) or in 1..{m.hidden_size - 1} (below model.hidden_size)",
    )
    _require(math.isfinite(m.forget_bias), "model.forget_bias", m.forget_bias, "must be finite")
    for key in ("ar", "tar"):
        weight = getattr(m, key)
        _require(
            0 <= weight < math.inf, f"model.{key}", weight, "must be >= 0 and finite (0 = off)"
        )
    _require(
        m.cell_clip is None or 0 < m.cell_clip < math.inf,
        "model.cell_clip",
        m.cell_clip,
        "must be > 0 or null",
    )
    try:
        BLOCKS[m.block].check(m.backend, m.cell, m.num_layers, **m.cell_options())
        check_head(m)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _require(t.window > 0, "tbptt.window", t.window, positive)
    _require(
        t.stride is None or 0 < t.stride <= t.window,
        "tbptt.stride",
        t.stride,
        f"must be in 1..tbptt.window ({t.window}), or null for stride = window",
    )
    if t.vary:  # awd-lstm-lm's variable windows (data.VariedSpans)
        _require(
            t.stride in (None, t.window),
            "tbptt.stride",
            t.stride,
            "tbptt.vary=true draws each whole window (plain TBPTT): leave tbptt.stride null",
        )
        _require(
            t.window >= 2 * VARY_MIN,
            "tbptt.window",
            t.window,
            f"tbptt.vary=true needs a window of at least {2 * VARY_MIN}: lengths are drawn "
            f"around window / 2 too, {VARY_SD} steps apart and at least {VARY_MIN}",
        )
    _require(
        mem.checkpoint in CHECKPOINT_MODES,
        "memory.checkpoint",
        mem.checkpoint,
        f"choose from {', '.join(CHECKPOINT_MODES)}",
    )
    _require(
        mem.checkpoint != "chunk" or (mem.chunk is not None and mem.chunk > 0),
        "memory.chunk",
        mem.chunk,
        "memory.checkpoint=chunk needs a positive chunk length",
    )
    _require(mem.chunk is None or mem.chunk > 0, "memory.chunk", mem.chunk, positive)
    if mem.budget is not None:
        try:
            parse_size(mem.budget)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _require(tr.max_steps > 0, "trainer.max_steps", tr.max_steps, positive)
    _require(
        tr.val_check_interval > 0, "trainer.val_check_interval", tr.val_check_interval, positive
    )
    _require(tr.devices > 0, "trainer.devices", tr.devices, positive)
    _require(
        tr.accelerator in ACCELERATORS,
        "trainer.accelerator",
        tr.accelerator,
        f"choose from {', '.join(ACCELERATORS)}",
    )
    _require(tr.num_nodes > 0, "trainer.num_nodes", tr.num_nodes, positive)
    _require(
        tr.strategy in STRATEGIES,
        "trainer.strategy",
        tr.strategy,
        f"choose from {', '.join(STRATEGIES)}",
    )
    _require(
        math.isfinite(tr.ddp_timeout) and tr.ddp_timeout > 0,
        "trainer.ddp_timeout",
        tr.ddp_timeout,
        "must be a finite number of seconds > 0",
    )
    _require(
        tr.precision in PRECISIONS,
        "trainer.precision",
        tr.precision,
        f"choose from {', '.join(PRECISIONS)}",
    )
    _require(tr.log_every_n_steps > 0, "trainer.log_every_n_steps", tr.log_every_n_steps, positive)
    _require(tr.progress_every > 0, "trainer.progress_every", tr.progress_every, positive)
    seconds = tr.progress_seconds
    _require(seconds > 0, "trainer.progress_seconds", seconds, "must be > 0")
    try:
        threads.parse(tr.threads)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _require(tr.checkpoint_every > 0, "trainer.checkpoint_every", tr.checkpoint_every, positive)
    _require(
        cfg.resume in (None, *RESUME), "resume", cfg.resume, f"choose from {', '.join(RESUME)}"
    )
    _require(
        cfg.resume is None or cfg.ckpt_path is None,
        "resume",
        cfg.resume,
        f"give either resume={cfg.resume} or ckpt_path=PATH, not both",
    )
    _require(0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be in 0..2**32-1 (numpy's range)")
    _require(tr.sample_length >= 0, "trainer.sample_length", tr.sample_length, "must be >= 0")
    # Last: these import the classes the config names (Lightning, torch.optim).
    optim.check(o)
    trainer_extras.check_trainer_args(tr.extra)
    trainer_extras.check(cfg.logger, cfg.callbacks)
    return cfg


# The data.* keys that tokenizers read; each tokenizer names those it uses (Tokenizer.settings).
TOKENIZER_KEYS = ("vocab_size", "min_count", "tokenizer_file")


def check_tokenizer(d: DataConfig) -> None:
    """data.tokenizer exists, a key it does not read keeps its default, and its own check passes
    (vocabulary size, tokenizer_file)."""
    _require(
        d.tokenizer in TOKENIZERS,
        "data.tokenizer",
        d.tokenizer,
        f"choose from {', '.join(TOKENIZERS)}, or name your own as module:Class",
    )
    kind = TOKENIZERS.get(d.tokenizer)
    _require(d.min_count >= 1, "data.min_count", d.min_count, "must be a positive integer")
    for key in TOKENIZER_KEYS:
        if key == "vocab_size" and names_token_array(d):
            continue  # a token array's own vocabulary: its reader checks the ids against it
        value, default = getattr(d, key), DataConfig.__dataclass_fields__[key].default
        readers = [n for n in TOKENIZERS if key in TOKENIZERS.get(n).settings]
        _require(
            key in kind.settings or value == default,
            f"data.{key}",
            value,
            f"not read by data.tokenizer={d.tokenizer}; it is for data.tokenizer="
            f"{' or '.join(readers)}",
        )
    kind.check(d)


def to_dict(cfg: Config) -> dict:
    """Plain containers, for checkpoints and logs."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """A config saved in a checkpoint (optim keys of earlier versions upgraded), checked."""
    if "optim" in d:
        d = {**d, "optim": optim.upgrade(d["optim"])}
    return validate(d, saved=True)
