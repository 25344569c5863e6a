"""CPU peak memory: the raw profiler events are checked once, and a broken private API falls back
to the public events with one warning and the same answer on whole-op allocations."""

from __future__ import annotations

import logging

import pytest
import torch

from seqtrain import profiling

MiB = 1 << 20


def three_blocks() -> None:
    """Peak 3 MiB: a and b live together, then c replaces a."""
    a = torch.ones(MiB // 4)
    b = torch.ones(MiB // 4)
    del a
    c = torch.ones(2 * MiB // 4)
    del b, c


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiling, "_raw_events_ok", None)


def test_raw_events_pass_their_check_in_this_torch(unchecked: None) -> None:
    assert profiling.raw_events_usable()
    assert 3 * MiB <= profiling.cpu_peak_bytes(three_blocks) < 3 * MiB + (64 << 10)


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda prof: prof.profiler.no_such_attribute, id="missing"),
        pytest.param(lambda prof: 123, id="wrong-result"),
    ],
)
def test_a_broken_private_api_falls_back_to_public_events(
    breakage, unchecked: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(profiling, "_peak_raw", breakage)
    with caplog.at_level(logging.WARNING, logger=profiling.__name__):
        first = profiling.cpu_peak_bytes(three_blocks)
        second = profiling.cpu_peak_bytes(three_blocks)
    assert 3 * MiB <= first == second < 3 * MiB + (64 << 10)
    warnings = [r for r in caplog.records if "public events instead" in r.getMessage()]
    assert len(warnings) == 1, "warn once per process, not per measurement"
