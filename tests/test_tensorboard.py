"""TensorBoard, read back from the event files: scalar groups, finite values, hparams, samples."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .conftest import REQUIRED_SCALARS
from .test_cli import ENV

pytestmark = pytest.mark.slow

GROUPS = ("train/", "val/", "perf/", "optim/", "memory/")
SWEPT = {"optim.lr": 0.003, "tbptt.window": 8, "model.backend": "modular"}


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path_factory.mktemp("tb")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqtrain",
            "+debug=tiny",
            *(f"{k}={v}" for k, v in SWEPT.items()),
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env={**ENV, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files
    accs = [EventAccumulator(str(f), size_guidance={"scalars": 0}).Reload() for f in files]
    return run_dir, accs


def scalars(accs) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for acc in accs:
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_scalars_are_grouped_and_finite(events) -> None:
    _, accs = events
    values = scalars(accs)
    for tag in REQUIRED_SCALARS:
        assert tag in values, tag
    for tag, series in values.items():
        assert tag.startswith((*GROUPS, "hp/", "epoch")), f"{tag}: outside the groups {GROUPS}"
        assert series and all(math.isfinite(v) for v in series), f"{tag}: not finite"
    memory = [t for t in values if t.startswith("memory/")]
    if memory:  # logged once the memory accounting is in; then every value must be a size
        assert all(v >= 0 for t in memory for v in values[t])


def test_hparams_hold_the_swept_values_and_final_metrics(events) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, accs = events
    summary = json.loads((run_dir / "summary.json").read_text())
    hparams, metric_tags = {}, set()
    for acc in accs:
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
    want = {"hp/val_bpc", "hp/tokens_per_s"} | (
        {"hp/peak_bytes"} if "peak_bytes" in summary else set()
    )
    assert want <= metric_tags
    values = scalars(accs)
    assert values["hp/val_bpc"][-1] == pytest.approx(summary["val_bpc"], rel=1e-6)
    assert values["hp/tokens_per_s"][-1] == pytest.approx(summary["tokens_per_s"], rel=1e-6)
    if "peak_bytes" in summary:
        assert values["hp/peak_bytes"][-1] == pytest.approx(summary["peak_bytes"], rel=1e-6)


def test_text_samples_are_logged(events) -> None:
    _, accs = events
    assert any("samples/text_summary" in acc.Tags()["tensors"] for acc in accs)
