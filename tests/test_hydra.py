"""Hydra's extension points through the real command line: your own config folders, experiments
and group options, shell completion, and the `_target_` groups (optim, logger, callbacks) and
Trainer arguments seqtrain builds from config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqtrain import cli, hydra_compat

from . import conftest
from .conftest import ROOT, refusal
from .test_cli import ENV

# +debug=tiny, smaller still: one validation over a small val split.
TINY = ["+debug=tiny", "data.max_bytes=20000", "trainer.max_steps=4", "trainer.sample_length=0"]
ENV = {**ENV, "OMP_NUM_THREADS": "1"}


def seqtrain(*args: str) -> subprocess.CompletedProcess:
    # cwd: tests.plugins is importable from the root, as a user's own package would be
    return conftest.seqtrain(*args, env=ENV, cwd=ROOT)


def train(run_dir: Path, *args: str) -> dict:
    done = seqtrain(*args, *TINY, f"hydra.run.dir={run_dir}")  # flags first, as argparse needs
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("seqtrain: error: ") and "\n" not in err, err
    return err


@pytest.fixture
def my_conf(tmp_path: Path) -> Path:
    """A user's config folder: an experiment of their own and a model option of their own."""
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "model").mkdir()
    (conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: my_model\ntbptt:\n  stride: 8\n"
    )
    (conf / "model" / "my_model.yaml").write_text("hidden_size: 12\nnum_layers: 2\n")
    return conf


def test_own_config_dir_with_own_experiment_and_model(my_conf: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(run, "--config-dir", str(my_conf), "+experiment=mine")
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 8  # tbptt.stride=8 from mine
    recorded = (run / ".hydra" / "config.yaml").read_text()
    assert "num_layers: 2" in recorded and "stride: 8" in recorded
    assert "embedding_size: 8" in recorded  # the rest of the model node is the full schema's


def test_hydra_searchpath_adds_options(my_conf: Path, tmp_path: Path) -> None:
    done = seqtrain(*TINY, f"hydra.searchpath=[file://{my_conf}]", "model=my_model", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "num_layers: 2" in done.stdout  # (+debug=tiny sets hidden_size after model=)


def test_a_bad_key_inside_an_own_experiment_names_the_file_and_the_key(
    my_conf: Path, tmp_path: Path
) -> None:
    (my_conf / "experiment" / "old.yaml").write_text("# @package _global_\noptim:\n  betas: 1\n")
    done = seqtrain("--config-dir", str(my_conf), "+experiment=old", *TINY)
    assert one_line_error(done) == (
        "seqtrain: error: experiment/old.yaml: optim.betas is not a key; 'optim' takes: "
        "optimizer, lr, weight_decay, grad_clip, schedule, max_skipped, average, nonmono"
    )


def test_an_experiment_without_the_package_header_says_to_add_it(
    my_conf: Path, monkeypatch, capsys
) -> None:
    """Without `# @package _global_` Hydra puts an experiment's keys under `experiment.`, which
    reads as an unknown key: the line says what the file lacks."""
    (my_conf / "experiment" / "bare.yaml").write_text("model:\n  hidden_size: 32\n")
    argv = ["seqtrain", "--config-dir", str(my_conf), "+experiment=bare", *TINY]
    monkeypatch.setattr(sys, "argv", argv)
    assert refusal(cli.main, capsys=capsys) == (
        "seqtrain: error: experiment/bare.yaml: its keys landed under 'experiment.'; start the "
        "file with the line '# @package _global_' (as conf/experiment/char_lm.yaml does)"
    )


def test_unknown_option_lists_the_whole_search_path(my_conf: Path) -> None:
    done = seqtrain("--config-dir", str(my_conf), "model=nope")
    assert "model=nope: no such option; choose from lstm, my_model" in one_line_error(done)
    done = seqtrain("--config-dir", str(my_conf), "+experiment=minee")
    assert "experiment=minee: no such option; choose from char_lm, copy_task, mine" in (
        one_line_error(done)
    )


def test_help_and_cfg_work() -> None:
    done = seqtrain("--help")
    assert done.returncode == 0 and "optim: adamw, ntasgd, sgd" in done.stdout
    done = seqtrain("--cfg", "job")
    assert done.returncode == 0 and "hidden_size: 512" in done.stdout
    assert "_target_: torch.optim.AdamW" in done.stdout


TAB = r"""
eval "$(python -m seqtrain -sc install=bash)"
tab() {  # what bash does on a Tab at the end of the line $1
  COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"
  COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); _seqtrain_complete
  echo "${COMPREPLY[*]}"
}
tab "seqtrain model.hid"; tab "python -m seqtrain model.hid"; tab "python -m seqtrain +exp"
"""


def test_tab_completes_both_commands_in_a_real_bash(tmp_path: Path) -> None:
    """The documented install line, then Tabs as bash runs them, for `seqtrain` and `python -m
    seqtrain` (Hydra's own completion answers neither); the first Tab fills the cache, the same
    Tabs again are answered from it."""
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:"}
    env["PATH"] += ENV["PATH"]
    experiments = "+experiment=char_lm +experiment=copy_task +experiment=mqar"
    for _ in range(2):  # filling the cache, then reading it
        done = subprocess.run(["bash", "-c", TAB], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[:2] == ["model.hidden_size="] * 2, done.stdout
        assert lines[2].startswith(experiments), done.stdout
        assert (tmp_path / "seqtrain" / "completion.json").is_file()


def test_a_cached_tab_imports_no_torch(tmp_path: Path) -> None:
    """What makes a Tab instant: the answer comes before torch, Lightning or Hydra is imported."""
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path), "COMP_LINE": "seqtrain mod", "COMP_POINT": "12"}
    run = [sys.executable, "-m", "seqtrain", "-sc", "query=bash"]
    assert subprocess.run(run, capture_output=True, env=env).returncode == 0  # fills the cache
    probe = "import runpy, sys; sys.argv = ['seqtrain', '-sc', 'query=bash']\n"
    probe += "runpy.run_module('seqtrain', run_name='__main__')\n"
    probe += "print(sorted({'torch', 'lightning', 'hydra'} & sys.modules.keys()))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "model.hidden_size=" in done.stdout and done.stdout.splitlines()[-1] == "[]"


def test_sgd_trains_and_is_the_checkpointed_optimizer(tmp_path: Path) -> None:
    summary = train(tmp_path, "optim=sgd", "optim.optimizer.nesterov=true")
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = ckpt["optimizer_states"]
    group = state["param_groups"][0]
    assert group["nesterov"] is True and group["momentum"] == 0.9 and "betas" not in group


def test_two_loggers_and_an_extra_callback(tmp_path: Path) -> None:
    touched = tmp_path / "touched"
    train(
        tmp_path / "run",
        "logger=[tensorboard,csv]",
        "+callbacks.touch._target_=tests.plugins.touch.Touch",
        f"+callbacks.touch.path={touched}",
        "+trainer.deterministic=true",
    )
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header.split(",")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert touched.read_text() == "4"


def test_csv_logger_alone(tmp_path: Path) -> None:
    train(tmp_path, "logger=csv")
    assert "train/loss" in (tmp_path / "csv" / "metrics.csv").read_text()
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+trainer.gradient_clip_val=1"], "trainer.gradient_clip_val: not settable in seqtrain:"),
        (["+trainer.accumulate_grad_batches=2"], "would break the carry"),
        (["+trainer.max_epochs=2"], "use trainer.max_steps"),
        (["+trainer.no_such=1"], "trainer.no_such is not a lightning.Trainer argument"),
        (
            ["optim.optimizer._target_=torch.optim.AdamWW"],
            "optim.optimizer._target_=torch.optim.AdamWW: no such class or function",
        ),
        (["+optim.optimizer.momentum=0.9"], "optim.optimizer.momentum: torch.optim.AdamW takes"),
        (["+logger.csv._target_=lightning.pytorch.loggers.CSVLoger"], "no such class"),
        (["optim.optimizer.momentum=0.9"], "add the argument with +optim.optimizer.momentum="),
        (["model.hiden_size=3"], "model.hiden_size is not a key; 'model' takes: backend, cell,"),
        (["-m", "model.backend=cudnn,modular", "tbptt.windoww=3"], "tbptt.windoww is not a key"),
        (["-m", "data=stdlib,wiki"], "data=wiki: no such option; choose from stdlib"),
    ],
)
def test_bad_extension_input_is_one_line_and_writes_nothing(args, message, tmp_path) -> None:
    done = seqtrain(*args, *TINY, f"hydra.run.dir={tmp_path / 'run'}")
    assert message in one_line_error(done)
    assert not (tmp_path / "run" / ".hydra").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["+debug=tiny", "model=lstm"],
        ["-m", "--config-dir", "/x", "-cn", "train", "a=1,2"],
        ["--cfg", "job", "-p", "optim", "--resolve"],
        ["-sc", "install=bash"],
        ["--info", "searchpath"],
    ],
)
def test_the_fallback_parser_reads_the_command_line_as_hydra_does(argv) -> None:
    if hydra_compat.hydra_args_parser is None:
        pytest.skip("this Hydra no longer has its own parser: the fallback is all there is")
    hydra = vars(hydra_compat.hydra_args_parser().parse_args(argv))
    assert vars(hydra_compat.fallback_args_parser().parse_args(argv)) == hydra
