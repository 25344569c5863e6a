"""DDP on CPU: 2 processes (gloo) against one process with the same global batch.

Each rank reads its own contiguous block of streams, so 2 ranks x B streams must train exactly
like 1 process x 2B streams: the same loss and gradient norm at every step, the same val bpc, and
the carried state of the 2B streams split across the ranks' checkpoint entries.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seqtrain.checkpoint import read
from seqtrain.data import Streams

from .conftest import assert_close, counting_corpus, finish, read_scalars, start_run
from .test_cli import ENV

pytestmark = pytest.mark.slow

RUN = [
    "+debug=tiny",
    "trainer.accelerator=cpu",
    "trainer.max_steps=24",
    "trainer.val_check_interval=12",
    "trainer.sample_length=0",
]
ONE = ["trainer.devices=1", "data.batch_size=4", "data.eval_batch_size=4"]
TWO = ["trainer.devices=2", "data.batch_size=2", "data.eval_batch_size=2"]  # same global batch
ENV = {**ENV, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return start_run(run_dir, [*RUN, *extra], ENV)


def train(run_dir: Path, *extra: str) -> Path:
    code, _, err = finish(start(run_dir, *extra))
    assert code == 0, err[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    return {"one": train(root / "one", *ONE), "two": train(root / "two", *TWO)}


def test_ranks_read_disjoint_blocks_that_cover_the_split() -> None:
    corpus = counting_corpus(241)  # token value = its position (all < 256)
    whole = Streams(corpus, batch_size=4, stride=16)
    ranks = [Streams(corpus, 2, 16, rank=r, world_size=2) for r in range(2)]
    # Rank r's streams are streams 2r, 2r+1 of one process with the global batch.
    for i in range(len(whole)):
        for field in ("inputs", "resets"):
            split = torch.cat([getattr(r[i], field) for r in ranks])
            assert torch.equal(split, getattr(whole[i], field))
    served = [
        np.concatenate([r[i].targets.flatten().numpy() for i in range(len(r))]).tolist()
        for r in ranks
    ]
    assert not set(served[0]) & set(served[1])  # disjoint
    assert sorted(served[0] + served[1]) == list(range(1, 4 * whole.length + 1))  # each once


def test_two_ranks_train_like_one_process_with_the_global_batch(runs) -> None:
    one, two = runs["one"], runs["two"]
    for tag in ("train/loss", "optim/grad_norm"):
        a, b = read_scalars(one, tag), read_scalars(two, tag)
        assert sorted(a) == sorted(b) and len(a) == 24, tag
        diff = max(abs(a[s] - b[s]) for s in a)
        assert diff < 1e-5, f"{tag}: max per-step diff {diff:.3g}"
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s2["tokens"] == s1["tokens"] == 24 * 4 * 16  # global tokens
    assert s2["steps"] == s1["steps"] == 24
    assert s2["val_bpc"] == pytest.approx(s1["val_bpc"], abs=1e-5)


def test_checkpoint_holds_every_ranks_carried_state_and_cursor(runs) -> None:
    single = read(runs["one"] / "checkpoints" / "last.ckpt")["seqtrain"]
    loop = read(runs["two"] / "checkpoints" / "last.ckpt")["seqtrain"]
    ranks = loop["ranks"]
    assert len(ranks) == 2 and "ranks" not in single
    assert [r["windows"] for r in ranks] == [single["windows"]] * 2
    # The 4 streams' carried (h, c): rank 0 holds streams 0-1, rank 1 streams 2-3.
    for part, h_one in enumerate(single["engine"]["state"]):
        h_two = [r["engine"]["state"][part] for r in ranks]
        assert all(h.shape[1] == 2 for h in h_two)
        assert_close(torch.cat(h_two, dim=1), h_one, f"carried state {part}", 1e-5)


def test_resume_under_ddp_is_exact(runs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, *TWO)
    for line in proc.stdout:  # rank 0 logs this right before it starts the other rank
        if "model:" in line:
            break
    proc.send_signal(signal.SIGUSR1)  # one rank's signal stops both at the same update
    code, out, err = finish(proc)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert "Traceback" not in err  # the rank without the signal stops cleanly too
    stopped = read(run_dir / "checkpoints" / "last.ckpt")
    assert 0 < stopped["global_step"] < 24 and len(stopped["seqtrain"]["ranks"]) == 2
    train(run_dir, *TWO, "resume=auto")
    assert read_scalars(run_dir, "train/loss") == read_scalars(runs["two"], "train/loss")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_bpc"] == json.loads((runs["two"] / "summary.json").read_text())["val_bpc"]

    # Another world size cannot continue these streams: one line, before any work.
    code, _, err = finish(start(run_dir, *ONE, "resume=auto"))
    assert code != 0 and "holds the streams and state of 2 rank(s)" in err


def test_a_regression_task_trains_alike_on_two_ranks(tmp_path: Path) -> None:
    """The task plug-in changes nothing in the data layout: 2 ranks x B series streams train like
    1 process x 2B, step by step, and report the same validation nMSE."""
    series = ["+experiment=series", "trainer.accelerator=cpu", "data.length=3000"]
    series += ["model.hidden_size=16", "model.embedding_size=4", "tbptt.window=20"]
    series += [
        "trainer.max_steps=16",
        "trainer.val_check_interval=8",
        "trainer.log_every_n_steps=1",
    ]
    runs = {}
    for name, ranks in (("one", ONE), ("two", TWO)):
        code, _, err = finish(start_run(tmp_path / name, [*series, *ranks], ENV))
        assert code == 0, err[-3000:]
        runs[name] = tmp_path / name
    a, b = (read_scalars(runs[n], "train/loss") for n in ("one", "two"))
    assert sorted(a) == sorted(b) and len(a) == 16
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    s1, s2 = (json.loads((runs[n] / "summary.json").read_text()) for n in ("one", "two"))
    assert s2["world_size"] == 2 and s2["val_nmse"] == pytest.approx(s1["val_nmse"], abs=1e-5)


def alone(port: int) -> dict[str, str]:
    """The environment of rank 0 of 2 whose peer never starts (as a broken SLURM or torchrun job
    would leave it): it waits at the DDP rendezvous."""
    return {
        **ENV,
        "LOCAL_RANK": "0",
        "NODE_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def test_a_rank_whose_peer_never_starts_fails_in_one_line(tmp_path: Path) -> None:
    proc = start_run(tmp_path, [*RUN, "trainer.devices=2", "trainer.ddp_timeout=3"], alone(29561))
    code, _, err = finish(proc)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert "trainer.ddp_timeout=3 s" in err and "1/2 clients joined" in err


def test_a_signal_ends_a_rank_blocked_at_the_rendezvous(tmp_path: Path) -> None:
    """Python runs signal handlers only between bytecodes; the rendezvous blocks in C for the
    whole ddp_timeout. The watchdog (callbacks.SignalWatchdog) ends the process anyway."""
    proc = start_run(tmp_path, [*RUN, "trainer.devices=2"], alone(29562))
    for line in proc.stdout:
        if "Initializing distributed" in line:
            break
    time.sleep(1.0)  # inside the blocking wait
    proc.send_signal(signal.SIGTERM)
    start_time = time.perf_counter()
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert time.perf_counter() - start_time < 15  # the default ddp_timeout is 600 s
    assert "SIGTERM while blocked in a wait" in err
