"""Chunked checkpointing changes memory and time, never gradients; the accounting and the planner
measure and predict what they claim. Tiny models: the whole file runs in seconds on a CPU."""

from __future__ import annotations

import dataclasses
import math
import platform
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from seqtrain import cells, tbptt
from seqtrain.data import DataSpec
from seqtrain.memory import (
    MemoryConfig,
    MemoryModel,
    SavedBytes,
    format_size,
    head_elements_per_step,
    measure_update,
    parse_size,
    plan_chunk,
    plan_memory,
)
from seqtrain.model import ModelConfig, RecurrentModel
from seqtrain.tasks import LanguageModelling, build_model
from seqtrain.tbptt import Engine

from .conftest import BYTE_LM, assert_close

V = 256


def model(backend: str = "cudnn", **options: object) -> RecurrentModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backend=backend, embedding_size=8, hidden_size=12, num_layers=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        return build_model(cfg, BYTE_LM)


def batch(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (b, t), generator=g)  # (B, T)
    y = torch.randint(0, V, (b, t), generator=g)  # (B, T)
    return x, y, torch.zeros(b, t, dtype=torch.bool)


def grads(m: RecurrentModel, chunk: int | None, seed: int = 7) -> dict[str, torch.Tensor]:
    """Gradients of one summed-loss update over a (3, 24) batch, RNG seeded the same each time."""
    x, y, r = batch(3, 24)
    torch.manual_seed(seed)
    loss = Engine(m, BYTE_LM, 24).run(x, y, r, None, chunk=chunk).loss
    loss.backward()
    out = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out


def uncheckpointed(fn, *args):
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# Sizes and modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 kib", 1536), ("1000", 1000)],
)
def test_sizes_parse_in_si_and_binary_units(text, size) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "12XB", "-5MiB", "0GiB", ""])
def test_bad_sizes_are_one_line_errors(text) -> None:
    with pytest.raises(ValueError, match=r"^memory.budget=.*: ") as err:
        parse_size(text)
    assert "\n" not in str(err.value)


def test_size_formatting() -> None:
    assert format_size(512 * 2**20) == "512.0 MiB" and format_size(100) == "100 B"


def test_auto_without_budget_takes_ceil_sqrt_window() -> None:
    assert plan_chunk(MemoryConfig("auto"), 2048) == 46
    assert plan_chunk(MemoryConfig("chunk", 32), 2048) == 32
    assert plan_chunk(MemoryConfig("none"), 2048) is None


def test_last_segment_is_a_whole_chunk() -> None:
    no_resets = torch.zeros(1, 10, dtype=torch.bool)
    assert tbptt.segment_bounds(10, no_resets, [0], 4) == [0, 2, 6]


# ---------------------------------------------------------------------------------------------
# Gradients: recomputed == kept, every backend, dropout on
# ---------------------------------------------------------------------------------------------


def backends() -> list:
    marks = {"compile": pytest.mark.slow}
    lstm = cells.base.implementations("lstm")  # every backend of the LSTM (fla runs gdn only)
    return [pytest.param(b, marks=marks.get(b, ())) for b in lstm]


@pytest.mark.parametrize("backend", backends())
def test_checkpointed_gradients_equal_kept_gradients(backend, monkeypatch) -> None:
    """The same segments, once recomputed in backward and once kept: dropout masks must replay."""
    try:
        m = model(backend, dropout=0.3, input_dropout=0.2)
    except NotImplementedError:
        pytest.skip(f"backend {backend} is not available")
    recomputed = grads(m, chunk=5)
    monkeypatch.setattr(tbptt, "checkpointed", uncheckpointed)
    kept = grads(m, chunk=5)
    for name, g in kept.items():
        assert_close(recomputed[name], g, f"{backend} {name}", 1e-6)


def test_zoneout_and_recurrent_dropout_replay_under_checkpointing(monkeypatch) -> None:
    m = model("modular", recurrent_dropout=0.3, zoneout=0.2, variational=True, dropout=0.2)
    recomputed = grads(m, chunk=4)
    monkeypatch.setattr(tbptt, "checkpointed", uncheckpointed)
    kept = grads(m, chunk=4)
    for name, g in kept.items():
        assert_close(recomputed[name], g, name, 1e-6)


def test_without_dropout_checkpointing_equals_one_pass() -> None:
    m = model()
    whole = grads(m, chunk=None)
    for name, g in grads(m, chunk=7).items():
        assert_close(g, whole[name], name, 1e-6)


# ---------------------------------------------------------------------------------------------
# Recomputation really happens: about one forward more in backward
# ---------------------------------------------------------------------------------------------


def test_backward_flops_rise_by_the_recomputed_forward() -> None:
    m = model("modular")
    x, y, r = batch(3, 24)
    engine = Engine(m, BYTE_LM, 24)

    def flops(chunk: int | None) -> tuple[int, int]:
        with FlopCounterMode(display=False) as fwd:
            loss = engine.run(x, y, r, None, chunk=chunk).loss
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
        m.zero_grad(set_to_none=True)
        return fwd.get_total_flops(), bwd.get_total_flops()

    forward, backward = flops(None)
    forward_chunked, backward_chunked = flops(6)
    assert forward > 0 and forward_chunked == forward
    # chunk 6 over 24 steps: 4 segments, the last (6 steps) is not recomputed -> 3/4 of a forward
    extra = (backward_chunked - backward) / forward
    assert extra == pytest.approx(18 / 24, rel=0.05), f"backward rose by {extra:.3f} forwards"


# ---------------------------------------------------------------------------------------------
# Accounting and the model
# ---------------------------------------------------------------------------------------------


def test_saved_bytes_count_each_storage_once_and_skip_parameters() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(8, 4, requires_grad=True)
    with SavedBytes(exclude=[w, x]) as saved:
        h = x @ w  # saves x and w: both excluded
        z = (h * h).sum()  # saves h twice: one storage
    assert saved.bytes == h.numel() * 4
    z.backward()


def test_engine_reports_saved_bytes_per_update() -> None:
    m = model()
    x, y, r = batch(2, 32)
    window = tbptt.Window(x, y, r, 0)
    kept = Engine(m, BYTE_LM, 32)
    kept.train_update(window, lambda loss: loss.backward())
    chunked = Engine(m, BYTE_LM, 32, chunk=4)
    chunked.train_update(window, lambda loss: loss.backward())
    assert 0 < chunked.saved_bytes < kept.saved_bytes / 3


@pytest.mark.parametrize("mode", ["none", "sqrt"])
def test_saved_bytes_at_three_window_lengths_follow_the_prediction(mode) -> None:
    """Calibrate at T = 16, predict T = 64 and 256: linear without checkpoints, ~sqrt with."""
    m, B = model(), 16

    def chunk(t: int) -> int | None:
        return None if mode == "none" else math.ceil(math.sqrt(t))

    def saved(t: int) -> int:
        return measure_update(Engine(m, BYTE_LM, t), B, t, chunk(t)).saved_bytes

    first = {chunk(16): measure_update(Engine(m, BYTE_LM, 16), B, 16, chunk(16))}
    calibrated = MemoryModel.from_shapes(m, B, 16).calibrated(first)
    for t in (64, 256):
        predicted = MemoryModel.from_shapes(m, B, t)
        predicted.step_saved = calibrated.step_saved
        assert saved(t) == pytest.approx(predicted.saved(chunk(t)), rel=0.1), f"T={t}"
    growth = math.log(saved(256) / saved(64), 4)  # the exponent of T
    assert growth == pytest.approx(1.0 if mode == "none" else 0.5, abs=0.15)


def test_probe_leaves_gradients_and_random_stream_untouched() -> None:
    m = model(dropout=0.3)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    measure_update(Engine(m, BYTE_LM, 16), 2, 16, 4)
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------


def test_planner_keeps_to_several_budgets() -> None:
    m = model()
    T, B = 96, 4
    engine = Engine(m, BYTE_LM, T)
    none = measure_update(engine, B, T, None).peak_bytes
    smallest = measure_update(engine, B, T, 8).peak_bytes
    chunks = []
    for fraction in (0.0, 0.3, 0.6, 1.2):  # from near the minimum to more than enough
        budget = int(smallest * 1.05 + fraction * (none - smallest))
        plan = plan_memory(MemoryConfig("auto", budget=str(budget)), engine, B, say=print)
        assert plan.peak_bytes <= budget, f"budget {budget}: {plan}"
        assert measure_update(engine, B, T, plan.chunk).peak_bytes <= budget
        chunks.append(T if plan.chunk is None else plan.chunk)
    assert chunks == sorted(chunks) and chunks[-1] == T  # more budget: less recomputation


@pytest.mark.parametrize("head", ["linear", "adaptive"])
def test_at_a_large_vocabulary_the_plan_counts_the_head(head) -> None:
    """V = 4096 over a 16-wide LSTM: the head's (B, V) log-softmax and its gradients, not the
    stack, fill an update. The shape model alone picks a chunk that keeps a budget which a
    model of the stack alone breaks (it sees no need to checkpoint); the planner keeps it too,
    its predicted peak within 10% of the measured one."""
    torch.manual_seed(0)
    task = LanguageModelling(DataSpec("tokens", 4096, 4096))
    cutoffs = [500, 1500] if head == "adaptive" else []
    m = build_model(
        ModelConfig(embedding_size=16, hidden_size=16, head=head, cutoffs=cutoffs), task
    )
    T, B = 64, 4
    engine = Engine(m, task, T)
    none = measure_update(engine, B, T, None).peak_bytes
    budget = none // 3
    shapes = MemoryModel.from_shapes(m, B, T)
    saved, peak = (4 * n for n in head_elements_per_step(m.head, B))  # float32 bytes
    assert peak > 2 * (shapes.step_peak - peak)  # the head dominates
    stack_only = dataclasses.replace(
        shapes, step_saved=shapes.step_saved - saved, step_peak=shapes.step_peak - peak
    )
    assert stack_only.fit(budget) is None  # "no checkpointing fits" ...
    assert none > budget  # ... but it does not
    chunk = shapes.fit(budget)
    assert measure_update(engine, B, T, chunk).peak_bytes <= budget
    plan = plan_memory(MemoryConfig("auto", budget=str(budget)), engine, B, say=print)
    assert plan.peak_bytes <= budget
    assert plan.predicted_peak_bytes == pytest.approx(plan.peak_bytes, rel=0.1)


def test_budget_below_the_minimum_states_the_minimum() -> None:
    m = model()
    with pytest.raises(ValueError, match=r"below the minimum of [\d.]+ KiB .* \(chunk \d+\)"):
        plan_memory(MemoryConfig("auto", budget="1KiB"), Engine(m, BYTE_LM, 64), 4)


def test_fixed_plan_over_budget_is_refused() -> None:
    m = model()
    with pytest.raises(ValueError, match="no checkpointing needs a peak of"):
        plan_memory(MemoryConfig("none", budget="20KiB"), Engine(m, BYTE_LM, 64), 4)


def test_plan_without_budget_is_measured_once() -> None:
    m = model()
    engine = Engine(m, BYTE_LM, 64)
    plan = plan_memory(MemoryConfig("auto"), engine, 4)
    assert plan.chunk == 8 and plan.probes == 1
    assert engine.chunk is None  # the planner measures; train.plan_chunks hands the engine its plan
    assert plan.saved_bytes > 0 and plan.peak_bytes >= plan.saved_bytes


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"budget": "12XB"}, "memory.budget=12XB: not a size; write a number and a unit"),
        ({"budget": "0MiB"}, "memory.budget=0MiB: must be more than 0 bytes"),
        ({"checkpoint": "chunk", "chunk": 0}, "memory.chunk=0: "),
        ({"checkpoint": "sometimes"}, "memory.checkpoint=sometimes: choose from none, chunk, auto"),
    ],
)
def test_bad_memory_settings_are_one_line_config_errors(memory, message) -> None:
    from seqtrain.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message) as err:
        validate({"memory": memory})
    assert "\n" not in str(err.value)


def test_memory_groups_compose() -> None:
    from hydra import compose, initialize_config_dir

    from seqtrain.cli import CONF_DIR
    from seqtrain.config import validate

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose("train", overrides=["memory=auto", "memory.budget=64MiB"]))
    assert cfg.memory.checkpoint == "auto" and parse_size(cfg.memory.budget) == 64 * 2**20


_FREE_AFTER_DEL = """
import ctypes, sys, torch
from seqtrain.memory import cache_host_memory
fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "on":
    assert cache_host_memory()
x = torch.ones(64 << 18)  # 64 MiB, above glibc's largest automatic mmap threshold
del x
print(libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="memory.host_cache needs glibc")
def test_host_cache_keeps_freed_memory_in_the_process() -> None:
    """A freed big tensor stays in malloc's free lists (reused without page faults) with the
    cache on, and goes back to the OS without it. Each case runs in a fresh process, since the
    setting is process-wide and cannot be undone."""
    free = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _FREE_AFTER_DEL, mode], capture_output=True)
        assert out.returncode == 0, out.stderr.decode()
        free[mode] = int(out.stdout)
    assert free["on"] >= 64 << 20 > free["off"]


# ---------------------------------------------------------------------------------------------
# The copy task's corpus
# ---------------------------------------------------------------------------------------------


def test_copy_task_corpus_repeats_each_symbol_after_the_lag() -> None:
    from seqtrain.data import DataConfig, Streams, load_corpus, split_corpus
    from seqtrain.data.synthetic import ALPHABET
    from seqtrain.errors import ConfigError
    from seqtrain.recall import recall

    cfg = DataConfig(source="copy", lag=3, max_bytes=70, batch_size=2)
    corpus = load_corpus(cfg)
    examples = corpus.values.reshape(9, 7)  # 9 examples of lag + 4 bytes
    assert bytes(examples[0, 1:]).startswith(b"...?")
    assert (examples[:, 0] == examples[:, 5]).all() and set(examples[:, 0]) <= set(ALPHABET)
    assert corpus.doc_starts.tolist() == list(range(0, 63, 7))
    # every training stream starts on an example, so all streams reset on the same steps
    streams = Streams(split_corpus(corpus, cfg.split)["train"], 2, 7)
    resets = streams.resets(0, streams.length)  # (2, L)
    assert streams.length % 7 == 0 and bool((resets[0] == resets[1]).all())
    with pytest.raises(
        ConfigError,
        match=(
            "data.source=adding: no such option; "
            "choose from text, series, pydoc, copy, mqar, mackey_glass"
        ),
    ):
        load_corpus(DataConfig(source="adding", max_bytes=70))
    result = recall(model(), lag=3, count=8)
    assert 0 <= result["recall_accuracy"] <= 1 and result["chance_bits"] == 4.0
