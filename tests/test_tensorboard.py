"""TensorBoard, read back from the event files: scalar groups, finite values, hparams, samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seqtrain.train import HPARAMS

from .conftest import REQUIRED_SCALARS, seqtrain
from .test_cli import ENV

pytestmark = pytest.mark.slow

GROUPS = ("train/", "val/", "perf/", "optim/", "memory/")
SWEPT = {"optim.lr": 0.003, "tbptt.window": 8, "model.backend": "modular"}


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path_factory.mktemp("tb")
    done = seqtrain(
        "+debug=tiny",
        *(f"{k}={v}" for k, v in SWEPT.items()),
        f"hydra.run.dir={run_dir}",
        env={**ENV, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    final = list((run_dir / "tensorboard" / "final").glob("events.out.tfevents.*"))
    assert files and final
    accs, finals = (
        [EventAccumulator(str(f), size_guidance={"scalars": 0}).Reload() for f in group]
        for group in (files, final)
    )
    return run_dir, list(accs), list(finals)


def scalars(accs) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for acc in accs:
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_scalars_are_grouped_and_finite(events) -> None:
    _, accs, finals = events
    values = scalars(accs)
    for tag in REQUIRED_SCALARS:
        assert tag in values, tag
    for tag, series in values.items():  # no epoch, no run-level hp/ points in the time series
        assert tag.startswith(GROUPS), f"{tag}: outside the groups {GROUPS}"
        assert series and all(math.isfinite(v) for v in series), f"{tag}: not finite"
    # Sizes in MiB; on CPU the peak is the probe's one value, with the run's figures only.
    assert {"memory/saved_MiB", "memory/host_rss_MiB"} <= set(values)
    assert "memory/peak_MiB" not in values and "memory/peak_MiB" in scalars(finals)
    assert all(0 <= v < 1 << 20 for t in values if t.startswith("memory/") for v in values[t])


def test_hparams_hold_the_swept_values_and_final_metrics(events) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _, finals = events
    summary = json.loads((run_dir / "summary.json").read_text())
    hparams, metric_tags = {}, set()
    for acc in finals:
        try:
            contents = acc.PluginTagToContent("hparams").values()
        except KeyError:  # an event file without the hparams summaries
            continue
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            for key, value in data.session_start_info.hparams.items():
                hparams[key] = getattr(value, value.WhichOneof("kind"))
            metric_tags |= {m.name.tag for m in data.experiment.metric_infos}
    assert hparams, "no hparams in any event file"
    for key, value in SWEPT.items():  # numbers come back as floats
        assert hparams[key] == (value if isinstance(value, str) else pytest.approx(value)), key
    # The fixed columns and what the command line set; not the ~60 keys of the whole config.
    assert set(hparams) == set(HPARAMS) | set(SWEPT) | {"debug"}
    want = {"val/bpc", "val/bits_per_byte", "perf/tokens_per_s", "memory/peak_MiB"}
    want.add("memory/host_rss_MiB")
    assert metric_tags == want
    values = scalars(finals)
    assert values["val/bpc"] == [pytest.approx(summary["val_bpc"], rel=1e-6)]
    assert values["perf/tokens_per_s"] == [pytest.approx(summary["tokens_per_s"], rel=1e-6)]
    assert values["memory/peak_MiB"] == [pytest.approx(summary["peak_bytes"] / 2**20, rel=1e-6)]
    assert summary["host_rss_bytes"] > 0


def test_text_samples_are_logged_with_the_prompt_marked(events) -> None:
    _, accs, _ = events
    samples = [e for acc in accs for e in acc.Tensors("samples/text_summary")]
    assert samples
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("**prompt** (48 bytes of val text):") and "**generated** (step" in text


def test_a_resumed_run_purges_the_points_it_redoes(tmp_path: Path) -> None:
    """A process killed after logging updates 5-9 but before checkpointing them: the resumed run
    logs them again, and TensorBoard shows each step once, with the resumed run's value."""
    from seqtrain.config import Config
    from seqtrain.trainer_extras import build_loggers

    from .conftest import tensorboard_points

    for first_step, value in ((0, 1.0), (5, 2.0)):
        (logger,) = build_loggers(Config().logger, tmp_path, first_step)
        for step in range(first_step, 10):
            logger.log_metrics({"train/loss": value}, step=step)
        logger.finalize("success")
    assert tensorboard_points(tmp_path, "train/loss") == [(s, 1.0) for s in range(5)] + [
        (s, 2.0) for s in range(5, 10)
    ]
