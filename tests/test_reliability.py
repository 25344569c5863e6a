"""Exact resume, preemption by signal, kills mid-save, non-finite guards."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from seqtrain import model as model_module
from seqtrain import module as module_module
from seqtrain import train
from seqtrain.checkpoint import AtomicCheckpointIO, newest_complete, read
from seqtrain.module import NonFiniteError

from .conftest import composed, finish, read_scalars, start_run, tensorboard_points
from .test_cli import ENV

# Dropout on, two layers: the RNG must be restored for the losses to match bit for bit.
RUN = [
    "+debug=tiny",
    "model.num_layers=2",
    "model.dropout=0.1",
    "trainer.max_steps=150",
    "trainer.val_check_interval=50",
    "trainer.log_every_n_steps=1",
    "trainer.sample_length=0",
]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return start_run(run_dir, [*RUN, *extra], ENV)


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    """Read the log (stdout) until `text`: training is about to start, handlers installed."""
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"{text!r} never appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = finish(start(run_dir))
    assert code == 0, err[-2000:]
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    losses, expected = read_scalars(run_dir, "train/loss"), read_scalars(reference, "train/loss")
    assert len(expected) == 150
    assert losses == expected  # bit-identical, every step
    summary = json.loads((run_dir / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    assert summary["val_bpc"] == want["val_bpc"]
    assert summary["tokens"] == want["tokens"] and summary["steps"] == want["steps"]


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_exact(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_line(proc, "model:")
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM: stopped after step" in out
    command = out.split("resume with: ")[1].strip()
    assert "resume=auto" in command and f"hydra.run.dir={run_dir}" in command
    stopped_at = read(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 <= stopped_at < 150  # 0: the signal came before the first update ended (dropped)
    code, _, err = finish(start(run_dir, "resume=auto"))
    assert code == 0, err[-2000:]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_resumable_checkpoint(
    reference: Path, tmp_path: Path
) -> None:
    """A checkpoint every update makes most kills land during or near a save."""
    rng = random.Random(0)
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        proc = start(run_dir, "trainer.checkpoint_every=1")
        wait_for_line(proc, "model:")
        time.sleep(rng.uniform(0.2, 1.5))
        proc.kill()
        proc.wait()
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            read(last)  # never truncated: a kill mid-save leaves the previous complete file
        code, _, err = finish(start(run_dir, "trainer.checkpoint_every=1", "resume=auto"))
        assert code == 0, err[-2000:]
        assert_same_run(run_dir, reference)
        # TensorBoard reads the run's files together: the redone updates show once each.
        points = tensorboard_points(run_dir, "train/loss")
        assert dict(points) == read_scalars(reference, "train/loss") and len(points) == 150


def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # a signal or kill mid-write

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def on_updates(monkeypatch, updates: set[int], action) -> None:
    """Apply `action` to the head's output in the chosen training updates (1-based).

    Counting updates, not forward calls, keeps the memory planner's probe forward (before
    training starts) out of the count.
    """
    original_step = module_module.SequenceModule.training_step
    original_logits = model_module.RecurrentModel.predict
    count = {"updates": 0}

    def training_step(self, batch, batch_idx):
        count["updates"] += 1
        return original_step(self, batch, batch_idx)

    def logits(self, h):
        out = original_logits(self, h)
        if self.training and count["updates"] in updates:
            return action(out)
        return out

    monkeypatch.setattr(module_module.SequenceModule, "training_step", training_step)
    monkeypatch.setattr(model_module.RecurrentModel, "predict", logits)


def poison_logits(monkeypatch, bad_updates: set[int]) -> None:
    """Make the head return NaN in the chosen training updates."""
    on_updates(monkeypatch, bad_updates, lambda out: out * float("nan"))


def tiny_job(tmp_path: Path, *overrides: str) -> train.Job:
    from seqtrain.config import validate

    cfg = validate(composed("+debug=tiny", "trainer.sample_length=0", *overrides))
    return train.prepare(cfg, tmp_path)


def test_a_nonfinite_update_is_skipped_and_training_goes_on(tmp_path, monkeypatch) -> None:
    poison_logits(monkeypatch, {3})
    summary = train.fit(tiny_job(tmp_path, "trainer.max_steps=6"))
    assert summary["skipped_steps"] == 1
    assert summary["steps"] == 6  # skipped updates are not optimizer steps
    assert all(v == v for v in read_scalars(tmp_path, "val/bpc").values())  # finite val
    skipped = read_scalars(tmp_path, "optim/skipped_steps")
    assert skipped[max(skipped)] == 1


def test_too_many_nonfinite_updates_stop_with_the_weights_from_before(
    tmp_path, monkeypatch
) -> None:
    poison_logits(monkeypatch, set(range(4, 100)))
    job = tiny_job(
        tmp_path, "trainer.max_steps=50", "trainer.checkpoint_every=1", "optim.max_skipped=3"
    )
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite updates") as err:
        train.fit(job)
    assert "\n" not in str(err.value)
    saved = read(tmp_path / "checkpoints" / "nonfinite.ckpt")
    before = read(tmp_path / "checkpoints" / "last.ckpt")  # written after step 3, the last good one
    assert before["global_step"] == saved["global_step"] == 3
    for name, value in before["state_dict"].items():
        assert torch.equal(saved["state_dict"][name], value), name
        assert torch.isfinite(value).all(), name


def test_killed_after_the_final_save_resumes_to_a_summary(tmp_path, monkeypatch) -> None:
    """A kill between the last checkpoint and summary.json: resuming trains nothing, finishes."""
    first = train.fit(tiny_job(tmp_path, "trainer.max_steps=6"))
    (tmp_path / "summary.json").unlink()
    again = train.fit(tiny_job(tmp_path, "trainer.max_steps=6", "resume=auto"))
    assert again["steps"] == 6 and again["tokens"] == first["tokens"]
    assert again["train_loss"] == first["train_loss"]
    assert again["val_bpc"] == first["val_bpc"]
    assert (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_stop_after_the_update_with_a_checkpoint(sig, tmp_path, monkeypatch):
    sent = []

    def signal_once(out):  # the signal lands in the middle of update 3
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return out

    on_updates(monkeypatch, {3}, signal_once)
    before = signal.getsignal(sig)
    summary = train.fit(tiny_job(tmp_path, "trainer.max_steps=6"))
    assert summary["stopped_by"] == signal.Signals(sig).name
    assert summary["steps"] == 3  # update 3 finished, then the run stopped
    assert read(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert not (tmp_path / "summary.json").exists()  # a stopped run is not a finished one
    assert signal.getsignal(sig) == before  # the handlers are handed back


def test_same_seed_same_losses(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        train.fit(tiny_job(tmp_path / name, "model.dropout=0.2", "model.num_layers=2"))
        runs.append(read_scalars(tmp_path / name, "train/loss"))
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_resume_refuses_another_model(tmp_path: Path) -> None:
    from seqtrain.checkpoint import CheckpointError

    train.fit(tiny_job(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.hidden_size=16 \(now 32\)"):
        tiny_job(tmp_path, "resume=auto", "model.hidden_size=32")
    job = tiny_job(tmp_path, "resume=auto", "model.backend=modular")  # same layout: allowed
    assert job.resume_from == tmp_path / "checkpoints" / "last.ckpt"


def test_newest_complete_skips_truncated_files(tmp_path: Path) -> None:
    train.fit(tiny_job(tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    (tmp_path / "checkpoints" / "zzz.ckpt").write_bytes(last.read_bytes()[:1000])
    assert newest_complete(tmp_path) in (last, tmp_path / "checkpoints" / "best.ckpt")


def test_a_stop_during_validation_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """A signal inside a validation pass (after update 2, mid-pass) abandons the pass; the
    checkpoint it saves resumes to the losses and figures of a run never stopped. Both runs
    have the same trainer.max_steps: it shapes the LR schedule (optim.effective_warmup)."""
    args = ["model.num_layers=2", "model.dropout=0.1", "trainer.max_steps=4"]
    args += ["trainer.val_check_interval=1"]  # a validation pass after every update
    expected = train.fit(tiny_job(tmp_path / "reference", *args))
    original = module_module.SequenceModule.validation_step

    def validation_step(self, batch, batch_idx):
        if self.global_step == 2 and batch_idx == 1 and not self.stop_requested:
            signal.raise_signal(signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_module.SequenceModule, "validation_step", validation_step)
    stopped = train.fit(tiny_job(tmp_path / "stopped", *args))
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] == 2
    monkeypatch.undo()
    resumed = train.fit(tiny_job(tmp_path / "stopped", *args, "resume=auto"))
    losses = read_scalars(tmp_path / "reference", "train/loss")
    assert len(losses) == 4 and read_scalars(tmp_path / "stopped", "train/loss") == losses
    assert resumed["val_bpc"] == expected["val_bpc"] and resumed["tokens"] == expected["tokens"]
