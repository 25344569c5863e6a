"""The engine: carried state is exact, TBPTT(k1, k2) trains what it claims, resets per stream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqtrain.data import Window
from seqtrain.tbptt import Engine, reset

from .conftest import BYTE_LM, assert_close


def window(x: torch.Tensor, index: int, resets: torch.Tensor | None = None) -> Window:
    """A window whose targets are the next inputs (the last target wraps; tests don't care)."""
    y = torch.roll(x, -1, dims=1)
    r = torch.zeros_like(x, dtype=torch.bool) if resets is None else resets
    return Window(x, y, r, index)


def full_loss(model, x: torch.Tensor, y: torch.Tensor, state=None) -> torch.Tensor:
    logits, _ = model(x, state)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_carried_windows_equal_one_pass(tiny_model) -> None:
    x = torch.randint(0, 256, (3, 40))
    logits, state = tiny_model(x)
    pieces, carried = [], None
    for a in range(0, 40, 16):  # windows of 16, 16, 8
        out, carried = tiny_model(x[:, a : a + 16], carried)
        pieces.append(out)
    assert_close(torch.cat(pieces, 1), logits, "outputs", 1e-6)
    for s, c in zip(state, carried, strict=True):
        assert_close(c, s, "final state", 1e-6)


def test_stateful_eval_equals_one_pass(tiny_model) -> None:
    tiny_model.eval()
    x = torch.randint(0, 256, (2, 33))
    y = torch.randint(0, 256, (2, 33))
    engine = Engine(tiny_model, BYTE_LM, window=10)
    total = 0.0
    for i, a in enumerate(range(0, 33, 10)):
        total += engine.eval_window(
            Window(
                x[:, a : a + 10],
                y[:, a : a + 10],
                torch.zeros(2, min(10, 33 - a), dtype=torch.bool),
                i,
            )
        )[0]
    with torch.no_grad():
        expected = full_loss(tiny_model, x, y).item() * x.numel()
    assert abs(total - expected) < 1e-3


@pytest.mark.parametrize("chunk", [None, 5])
def test_window_of_whole_sequence_equals_full_bptt(tiny_model, chunk) -> None:
    x = torch.randint(0, 256, (2, 24))
    w = window(x, 0)
    full_loss(tiny_model, w.inputs, w.targets).backward()
    expected = grads(tiny_model)
    Engine(tiny_model, BYTE_LM, window=24, chunk=chunk).train_update(
        w, lambda loss: loss.backward()
    )
    for name, g in grads(tiny_model).items():
        assert_close(g, expected[name], name, 1e-6)


def test_state_is_carried_detached_across_updates(tiny_model) -> None:
    x = torch.randint(0, 256, (2, 16))
    engine = Engine(tiny_model, BYTE_LM, window=8)
    engine.train_update(window(x[:, :8], 0), lambda loss: loss.backward())
    tiny_model.zero_grad()
    carried = engine.state
    assert all(not s.requires_grad for s in carried)
    _, expected_state = tiny_model(x[:, :8])
    for s, e in zip(carried, expected_state, strict=True):
        assert_close(s, e.detach(), "carried state", 1e-6)
    second = window(x[:, 8:], 1)
    result = engine.train_update(second, lambda loss: loss.backward())
    expected = full_loss(tiny_model, second.inputs, second.targets, carried)
    assert abs(result.loss - expected.item()) < 1e-6


def test_no_carry_starts_every_window_from_zero(tiny_model) -> None:
    x = torch.randint(0, 256, (2, 16))
    engine = Engine(tiny_model, BYTE_LM, window=8, carry=False)
    engine.train_update(window(x[:, :8], 0), lambda loss: None)
    second = window(x[:, 8:], 1)
    result = engine.train_update(second, lambda loss: None)
    expected = full_loss(tiny_model, second.inputs, second.targets).item()
    assert abs(result.loss - expected) < 1e-6


def test_k1_less_than_k2_trains_newest_k1_with_k2_steps_of_history(tiny_model) -> None:
    """Token p sits at position p, so the embedding rows with gradient show how far back it goes."""
    k1, k2 = 4, 10
    x = torch.arange(24).view(1, 24).repeat(2, 1)  # (B, T): token = position
    engine = Engine(tiny_model, BYTE_LM, window=k2, stride=k1)
    seen = []
    for i, a in enumerate(range(0, 20, k1)):  # five updates: new positions a .. a+3
        w = window(x[:, a : a + k1], i)
        state_before = engine.state
        history = engine.history
        result = engine.train_update(w, lambda loss: loss.backward())
        reached = tiny_model.embedding.weight.grad.abs().sum(1).nonzero().flatten().tolist()
        tiny_model.zero_grad(set_to_none=True)
        seen.append(reached)
        start = max(0, a + k1 - k2)
        assert reached == list(range(start, a + k1)), f"update {i}"
        # the loss is the mean over the newest k1 positions only, run from the history's state
        hx = torch.cat([history[0], w.inputs], 1) if history is not None else w.inputs
        hy = torch.cat([history[1], w.targets], 1) if history is not None else w.targets
        logits, _ = tiny_model(hx, state_before)
        expected = F.cross_entropy(logits[:, -k1:].flatten(0, 1), hy[:, -k1:].flatten())
        assert abs(result.loss - expected.item()) < 1e-6
    assert seen[-1] == list(range(10, 20))  # gradients reach k2 steps back, and no further


def test_reset_zeroes_only_the_chosen_stream() -> None:
    state = (torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0))
    keep = torch.tensor([True, False, True])
    h, c = reset(state, keep)
    assert h[:, 1].abs().sum() == 0 and c[:, 1].abs().sum() == 0
    assert torch.equal(h[:, [0, 2]], state[0][:, [0, 2]])
    assert torch.equal(c[:, [0, 2]], state[1][:, [0, 2]])


def test_mid_window_reset_restarts_only_that_stream(tiny_model) -> None:
    tiny_model.eval()
    x = torch.randint(0, 256, (3, 12))
    y = torch.randint(0, 256, (3, 12))
    resets = torch.zeros(3, 12, dtype=torch.bool)
    resets[1, 5] = True
    start = tuple(torch.randn_like(s) for s in tiny_model(x[:, :1])[1])
    engine = Engine(tiny_model, BYTE_LM, window=12)
    state = engine.run(x, y, resets, start).state
    untouched = engine.run(x, y, torch.zeros_like(resets), start).state
    _, fresh = tiny_model(x[1:2, 5:])  # stream 1 from a zero state at step 5
    for s, u, f in zip(state, untouched, fresh, strict=True):
        assert_close(s[:, [0, 2]], u[:, [0, 2]], "other streams", 1e-6)
        assert_close(s[:, 1], f[:, 0], "reset stream", 1e-6)


def test_new_epoch_drops_the_carried_state(tiny_model) -> None:
    x = torch.randint(0, 256, (2, 8))
    engine = Engine(tiny_model, BYTE_LM, window=8)
    engine.train_update(window(x, 0), lambda loss: None)
    result = engine.train_update(window(x, 0), lambda loss: None)  # index 0 again: a new epoch
    expected = full_loss(tiny_model, x, torch.roll(x, -1, 1)).item()
    assert abs(result.loss - expected) < 1e-6
