"""End to end through the real command line: train, then sample and evaluate from the checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqtrain import cli

from .conftest import ENV, REQUIRED_SCALARS, composed, refusal, seqtrain


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    done = seqtrain("+debug=tiny", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run directory: {out}" in done.stdout and "val/bpc:" in done.stdout
    assert f"tensorboard --logdir {out / 'tensorboard'}\n" in done.stdout  # runs `.`, `final`
    return out


def test_run_writes_summary_events_and_checkpoints(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "steps",
        "tokens",
        "train_seconds",
        "tokens_per_s",
        "train_loss",
        "val_loss",
        "val_bpc",
        "backend",
        "device",
    ):
        assert key in summary, key
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 16
    assert summary["backend"] == "cudnn" and summary["device"] == "cpu"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_without_a_terminal_progress_is_plain_lines_and_cli_log_ends_like_the_console(
    run_dir: Path,
) -> None:
    log = (run_dir / "cli.log").read_text()
    assert "\r" not in log and "\x1b" not in log  # no bar's control codes
    assert "step 6/6 (100%)" in log and "tokens/s  ETA" in log
    assert f"run directory: {run_dir}" in log and "val/bpc:" in log  # the result lines


def test_the_console_says_where_first_and_every_validation_in_a_line(run_dir: Path) -> None:
    log = (run_dir / "cli.log").read_text()
    start = log.index(f"tensorboard --logdir {run_dir / 'tensorboard'}")  # open while it trains
    assert log.index(f"run directory: {run_dir}") < start < log.index("validation at step 3:")
    lines = [line for line in log.splitlines() if "validation at step" in line]
    assert len(lines) == 2, lines  # +debug=tiny validates at steps 3 and 6
    seen = []
    for line, step in zip(lines, (3, 6), strict=True):
        assert f"validation at step {step}: val/loss " in line
        seen.append(float(re.search(r" val/bpc ([\d.]+)", line).group(1)))
        assert line.endswith(f"(best val/bpc {min(seen):.4f})")  # the best so far, this one too


def test_short_runs_validate_at_the_end(tmp_path: Path) -> None:
    # max_steps < val_check_interval: the last update is validated, best.ckpt written
    done = seqtrain("+debug=tiny", "trainer.val_check_interval=50", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_checkpoint"] == str(tmp_path / "checkpoints" / "best.ckpt")
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_tensorboard_has_the_promised_scalars_and_text(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list] = {"scalars": [], "tensors": []}
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events)).Reload()
        for kind in tags:
            tags[kind] += acc.Tags()[kind]
    for tag in REQUIRED_SCALARS:
        assert tag in tags["scalars"], tag
    assert "samples/text_summary" in tags["tensors"]


def test_sample_needs_only_the_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    done = seqtrain(
        f"ckpt={ckpt}", "prompt=def ", "length=40", module="seqtrain.sample", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("def ") and len(done.stdout.encode()) >= 40
    again = seqtrain(
        f"ckpt={ckpt}", "prompt=def ", "length=40", module="seqtrain.sample", cwd=tmp_path
    )
    assert again.stdout == done.stdout  # same seed, same text


def test_evaluate_reproduces_the_validation_figure(run_dir: Path, tmp_path: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    done = seqtrain(f"ckpt={ckpt}", "split=val", module="seqtrain.evaluate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bpc"] == pytest.approx(summary["val_bpc"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.hiden_size=3"], "model.hiden_size is not a key; 'model' takes:"),
        (["tbptt.window=0"], "tbptt.window=0: must be a positive integer"),
        (["tbptt.window=8", "tbptt.stride=9"], "tbptt.stride=9: must be in 1..tbptt.window (8)"),
        (["data.path=/no/such/file.txt"], "data.path=/no/such/file.txt: no such file"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line(args, message, tmp_path: Path) -> None:
    done = seqtrain("+debug=tiny", f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == done.stderr.strip()
    assert message in done.stderr


def test_console_script_is_the_same_command(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "seqtrain"
    if not exe.exists():
        pytest.skip("the seqtrain console script is not installed (pip install -e .)")
    done = subprocess.run(
        [str(exe), "+debug=tiny", "tbptt.window=0"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 2 and "tbptt.window=0: must be a positive integer" in done.stderr


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path: Path) -> None:
    """conf/ sits at the top of the repo; a regular (non-editable) install must find it too."""
    pytest.importorskip("hatchling")
    root = Path(__file__).resolve().parents[1]
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("seqtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("train.yaml", "experiment/char_lm.yaml", "model/lstm.yaml", "debug/tiny.yaml"):
        assert f"seqtrain/conf/{config}" in names, config


@pytest.mark.parametrize(
    ("module", "keys"),
    [
        ("seqtrain.sample", ("ckpt=... (required)", "temperature=0.8", "top_k=null")),
        ("seqtrain.evaluate", ("split='test'", "batch_size=null", "data.KEY=VALUE")),
        ("seqtrain.recall", ("ckpt=... (required)", "examples=512")),
    ],
)
def test_checkpoint_tools_have_help(module: str, keys: tuple[str, ...]) -> None:
    done = seqtrain("--help", module=module)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"python -m {module} ckpt=PATH")
    for key in keys:
        assert key in done.stdout, key


@pytest.mark.parametrize("tool", ["sample", "evaluate", "recall"])
def test_checkpoint_tools_parse_and_help_before_torch_loads(tool: str) -> None:
    """--help and bad arguments answer at once: nothing heavy loads before the arguments are
    parsed (torch alone takes seconds to import on a busy machine)."""
    script = (
        "import sys\n"
        f"from seqtrain import {tool} as tool\n"
        "for argv in (['--help'], ['no_such_key=1']):\n"
        "    try:\n"
        "        tool.main(argv)\n"
        "    except SystemExit as exit_:\n"
        "        print('exit', exit_.code)\n"
        "print('loaded:', [m for m in ('torch', 'hydra', 'lightning') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV)
    assert "exit 0" in done.stdout and "exit 2" in done.stdout, done.stderr[-2000:]
    assert "no_such_key is not a key" in done.stderr
    assert "loaded: []" in done.stdout


def test_the_sample_tool_samples_as_training_does() -> None:
    from seqtrain.sample import SampleArgs
    from seqtrain.tasks import SAMPLE_TEMPERATURE

    assert SampleArgs.temperature == SAMPLE_TEMPERATURE  # written twice: sample.py loads no torch


def test_training_help_is_seqtrains_own() -> None:
    done = seqtrain("--help")
    assert done.returncode == 0 and done.stdout.startswith("seqtrain: train recurrent")
    assert "cli is powered by Hydra" not in done.stdout and "+experiment=char_lm" in done.stdout


def test_the_tensorboard_address_pins_loss_and_the_task_figure() -> None:
    import urllib.parse

    from seqtrain.cli import tensorboard_url

    url = urllib.parse.urlsplit(tensorboard_url("val/bpc"))
    query = urllib.parse.parse_qs(url.query)
    pins = json.loads(query["pinnedCards"][0])
    assert [p["tag"] for p in pins] == ["train/loss", "val/loss", "train/bpc", "val/bpc"]
    assert query["smoothing"] == ["0"]  # a few validations, drawn as they are
    assert url.fragment == "timeseries"


def test_tensorboards_page_reads_each_parameter_of_the_address() -> None:
    """The installed TensorBoard's time-series page (its bundled index.js) reads every query
    parameter of the printed address, and `smoothing` overrides the stored setting: a parameter
    TensorBoard renamed would silently do nothing."""
    import urllib.parse
    import zipfile

    import tensorboard

    from seqtrain.cli import tensorboard_url

    with zipfile.ZipFile(Path(tensorboard.__file__).parent / "webfiles.zip") as bundle:
        page = bundle.read("index.js").decode()
    start = re.search(r"deserializeQueryParams\(\w+\)\{", page).start()  # its definition
    body = page[start : page.index("unknownQueryParams", start)]
    read = set(re.findall(r'case"(\w+)"', body))  # case"pinnedCards": ...
    before = page[max(0, start - 20_000) : start]  # minified names: y4="smoothing", ...
    for name in re.findall(r"case (\w+):", body):  # case y4: ...
        values = re.findall(rf"\b{re.escape(name)}=\"(\w+)\"", before)
        read |= set(values[-1:])
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(tensorboard_url("val/bpc")).query)
    assert set(query) == {"pinnedCards", "smoothing"} and set(query) <= read, read
    assert re.search(r"\.metrics\.smoothing.{0,300}scalarSmoothing:", page)  # the override


def test_the_printed_logdir_is_where_the_tensorboard_logger_writes(tmp_path: Path) -> None:
    from seqtrain.cli import tensorboard_dir
    from seqtrain.config import validate

    cfg = validate(composed())
    assert tensorboard_dir(cfg.logger, tmp_path) == tmp_path / "tensorboard"
    assert tensorboard_dir(validate(composed("logger=csv")).logger, tmp_path) is None
    both = validate(composed("logger=[csv,tensorboard]", "logger.tensorboard.name=tb"))
    assert tensorboard_dir(both.logger, tmp_path) == tmp_path / "tb"


def test_a_resumed_bar_counts_from_the_resumed_step_to_max_steps(tmp_path: Path) -> None:
    assert seqtrain("+debug=tiny", f"hydra.run.dir={tmp_path}").returncode == 0  # to step 6
    done = seqtrain(
        "+debug=tiny", "trainer.max_steps=8", "trainer.progress_bar=true", "resume=auto",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    frames = done.stderr.replace("\r", "\n")  # the bar is on stderr, the log on stdout
    bars = [line for line in frames.splitlines() if line.startswith("train:")]
    assert frames.lstrip().startswith("train:  75%|") and "6/8" in bars[0]
    assert all("/8 [" in bar for bar in bars)  # never 7/? (no total, no ETA)
    assert "\r" not in done.stdout
    # The task's headline figure, and tokens/s as a whole number with separators, not 4.81e+3.
    assert "train/bpc=" in bars[-1]
    assert re.search(r"tokens/s=\d{1,3}(,\d{3})*[,\]]", bars[-1]), bars[-1]
    # stdout is a pipe beside the bar on the terminal: the progress lines go there and to cli.log.
    assert "step 8/8 (100%)" in done.stdout
    assert "step 8/8 (100%)" in (tmp_path / "cli.log").read_text()


def test_beside_the_bar_progress_lines_go_to_the_log_file_only(tmp_path: Path, caplog) -> None:
    """stderr and stdout both the terminal: the bar shows progress, cli.log still gets a line
    every trainer.progress_seconds, and the console gets none (it would break the bar)."""
    import logging
    import types

    from seqtrain.callbacks import ProgressLines

    from .conftest import BYTE_LM

    handler = logging.FileHandler(tmp_path / "cli.log")
    logging.getLogger().addHandler(handler)
    try:
        lines = ProgressLines(every=100, seconds=1e-9, file_only=True)  # due at every update
        trainer = types.SimpleNamespace(global_step=0, max_steps=10, is_global_zero=True)
        module = types.SimpleNamespace(tokens_seen=0, train_loss=2.0, task=BYTE_LM)
        lines.on_train_start(trainer, module)
        trainer.global_step, module.tokens_seen = 1, 64
        with caplog.at_level(logging.INFO, logger="seqtrain"):
            lines.on_train_batch_end(trainer, module, {"tokens": 64}, None, 0)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert "step 1/10 (10%)  loss 2.0000" in (tmp_path / "cli.log").read_text()
    assert not caplog.records  # nothing through the console's handlers


def test_the_bar_shows_a_smoothed_speed_and_the_curves_each_updates(monkeypatch) -> None:
    import types

    from seqtrain import callbacks

    clock = iter([0.0, 1.0, 1.5])  # two updates: 1000 tokens in 1 s, then in 0.5 s
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    bar, curve = [], []
    module = types.SimpleNamespace(
        log=lambda name, value, **kw: bar.append(value),
        log_step=lambda metrics: curve.append(metrics["perf/tokens_per_s"]),
    )
    throughput = callbacks.Throughput()
    throughput.on_train_batch_start(None, module, None, 0)
    for _ in range(2):
        throughput.on_train_batch_end(None, module, {"tokens": 1000}, None, 0)
    assert curve == [1000.0, 2000.0]  # TensorBoard: every update's own speed
    assert bar[0] == 1000.0 and 1000.0 < bar[1] < 1100.0  # the bar: a jump moves it a little
    assert throughput.tokens_per_s == 2000 / 1.5  # the summary: all tokens over all time


def test_overrides_on_both_sides_of_a_flag_reach_the_checks(monkeypatch, capsys) -> None:
    """Hydra's parser takes its overrides in one run: `a=1 -m b=2` or a --config-dir between
    overrides was 'unrecognized arguments' and a usage text; now the flags go first."""
    assert cli.flags_first(["a=1", "-m", "b=2,3"]) == ["-m", "a=1", "b=2,3"]
    assert cli.flags_first(["a=1", "--config-dir", "x", "b=2"]) == [
        "--config-dir",
        "x",
        "a=1",
        "b=2",
    ]
    argv = ["seqtrain", "+debug=tiny", "--config-dir", "/no/such/conf", "model.hidden_size=8"]
    monkeypatch.setattr(sys, "argv", argv)
    assert "--config-dir /no/such/conf: no such directory" in refusal(cli.main, capsys=capsys)
