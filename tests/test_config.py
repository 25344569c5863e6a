"""Configs: the YAML and the schema agree, and bad values are one-line errors naming the key."""

from __future__ import annotations

import pytest

from seqtrain.cli import check_command_line
from seqtrain.config import Config, ConfigError, TrainerConfig, from_dict, to_dict, validate
from seqtrain.data import DataConfig
from seqtrain.hydra_compat import parse_args
from seqtrain.memory import MemoryConfig
from seqtrain.model import ModelConfig
from seqtrain.optim import OptimConfig, lr_factor
from seqtrain.tasks import TaskConfig
from seqtrain.tbptt import TbpttConfig

from .conftest import composed


def test_yaml_defaults_equal_the_schema_defaults() -> None:
    """The dataclasses are the one source of defaults; the default options' whole nodes
    (optim.optimizer, logger) say the same as the dataclasses' defaults."""
    assert to_dict(validate(composed())) == to_dict(validate({}))
    assert composed().optim.optimizer == Config().optim.optimizer
    assert composed().logger == Config().logger


def test_checkpoint_configs_of_earlier_versions_load() -> None:
    old = to_dict(validate({}))
    old["optim"] = {
        "lr": 0.01,
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "grad_clip": 1.0,
        "warmup_steps": 7,
        "min_lr_ratio": 0.5,
        "max_skipped": 10,
    }
    optim = from_dict(old).optim
    assert optim.optimizer["betas"] == [0.9, 0.95] and optim.lr == 0.01
    assert optim.schedule["warmup_steps"] == 7 and optim.schedule["min_lr_ratio"] == 0.5


def test_char_lm_experiment_composes() -> None:
    cfg = validate(composed("+experiment=char_lm"))
    assert cfg.model.hidden_size == 512 and cfg.data.max_bytes is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tbptt.window=0"], "tbptt.window=0: must be a positive integer"),
        (["tbptt.stride=300"], r"tbptt.stride=300: must be in 1..tbptt.window \(128\)"),
        (
            ["model.backend=cudnnn"],
            "model.backend=cudnnn: choose from cudnn, jit, modular, compile",
        ),
        (["model.dropout=1.5"], r"model.dropout=1.5: must be a probability in \[0, 1\)"),
        (["trainer.precision=16"], "trainer.precision=16: choose from"),
        (["memory.checkpoint=chunk"], "memory.chunk=None: memory.checkpoint=chunk needs"),
        (["model.block=deep"], "model.block=deep: choose from plain, residual"),
        (
            ["model.block=residual", "model.proj_size=8"],
            "model.proj_size=8: a residual block adds the cell's output to its input",
        ),
        (
            [
                "model.block=residual",
                "model.cell=mingru",
                "model.backend=modular",
                "model.zoneout=0.1",
            ],
            "model.zoneout=0.1 is not supported by cell 'mingru'",
        ),
    ],
)
def test_impossible_values_are_one_line_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate(composed(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hiden_size=3"], "model.hiden_size is not a key; 'model' takes: backend, cell,"),
        (["sed=3"], "sed is not a key; the top level takes: data, model"),
        (["model.hidden_size=abc"], "model.hidden_size: Value 'abc' of type 'str' could not"),
        (["data=nope"], "data=nope: no such option; choose from stdlib, tinyshakespeare"),
        (["+experiment=char_llm"], "experiment=char_llm: no such option; choose from char_lm"),
        (["model.backend=cudnn,modular", "tbptt.windoww=3"], "tbptt.windoww is not a key"),
    ],
)
def test_typos_are_caught_before_hydra(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        check_command_line(parse_args(overrides))
    assert "\n" not in str(err.value)


def test_valid_overrides_pass() -> None:
    check_command_line(
        parse_args(
            ["+experiment=char_lm", "model.backend=cudnn,modular", "seed=3", "hydra.run.dir=x"]
        )
    )


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    schedule = OptimConfig().schedule
    warmup, floor = schedule["warmup_steps"], schedule["min_lr_ratio"]
    factors = [lr_factor(s, warmup, floor, 1000) for s in range(1001)]
    assert factors[0] == pytest.approx(1 / warmup)
    assert factors[warmup - 1] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(floor)
    after = factors[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_warmup_as_long_as_the_run_is_scaled_with_one_warning(caplog) -> None:
    import torch

    from seqtrain import optim

    cfg = validate(composed("trainer.max_steps=50"))  # the default warmup is 100 updates
    warnings = [r.getMessage() for r in caplog.records if "warmup_steps=100" in r.getMessage()]
    assert len(warnings) == 1 and "warming up over 5 updates" in warnings[0]
    optimizer, schedule = optim.build(cfg.optim, torch.nn.Linear(2, 2))
    rates = []
    for _ in range(50):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert max(rates) == pytest.approx(cfg.optim.lr)  # the configured rate is reached


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (DataConfig(batch_size=0), "data.batch_size=0: must be a positive integer"),
        (ModelConfig(hidden_size=0), "model.hidden_size=0: must be a positive integer"),
        (TbpttConfig(window=8, stride=9), r"tbptt.stride=9: must be in 1..tbptt.window \(8\)"),
        (MemoryConfig(checkpoint="chunk"), "memory.chunk=None: memory.checkpoint=chunk needs"),
        (OptimConfig(lr=0.0), "optim.lr=0.0: must be > 0"),
        (TrainerConfig(devices=0), "trainer.devices=0: must be a positive integer"),
        (TaskConfig(name="nosuch"), "task.name=nosuch: choose from lm, regression"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else "",
)
def test_each_group_checks_its_own_keys(group, message) -> None:
    """Each config class owns its checks and runs them alone, without the whole Config."""
    with pytest.raises(ConfigError, match=message):
        group.check()


def test_a_checkpoints_config_says_nothing_of_training(caplog) -> None:
    """A warmup longer than the run is worth a warning when training starts, not when sample or
    evaluate read the checkpoint's config (from_dict: validate(saved=True))."""
    short = to_dict(validate(composed("trainer.max_steps=5")))  # warmup 100 >= 5
    caplog.clear()
    with caplog.at_level("WARNING", logger="seqtrain"):
        from_dict(short)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="seqtrain"):
        validate(short)
    assert "never reach optim.lr" in caplog.text
