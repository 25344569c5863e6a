"""seqtrain's training throughput against a plain hand-written PyTorch TBPTT loop.

Both train the same model (nn.Embedding -> nn.LSTM -> nn.Linear) on the same byte streams for the
same number of updates, with the same work per update (forward + backward over a window, detached
state carry, global-norm clipping, AdamW, LR schedule). Runs are interleaved and repeated; the
figure is the median of per-pair ratios, so machine noise hits both sides alike.

    python scripts/bench_tbptt.py               # ~1 minute on 2 CPU cores
    python scripts/bench_tbptt.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from seqtrain import train
from seqtrain.config import validate
from seqtrain.data import BYTES, Streams, load_corpus, split_corpus
from seqtrain.optim import lr_factor

ROOT = Path(__file__).resolve().parents[1]


def config(steps: int, hidden: int) -> dict:
    return {
        "data": {"max_bytes": 3_000_000, "split": [0.98, 0.01, 0.01]},
        "model": {"hidden_size": hidden},
        "trainer": {
            "max_steps": steps,
            "val_check_interval": 10 * steps,  # no validation inside the timed updates
            "sample_length": 0,
            "checkpoint_every": 10 * steps,
            "progress_bar": False,
        },
    }


def run_seqtrain(overrides: dict) -> float:
    cfg = validate(OmegaConf.create(overrides))
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train.fit(train.prepare(cfg, Path(run_dir)))
    return summary["tokens_per_s"]


def run_plain(overrides: dict) -> float:
    """What a user would write by hand: the same model, data layout and optimizer."""
    cfg = validate(OmegaConf.create(overrides))
    torch.manual_seed(cfg.seed)
    corpus = split_corpus(load_corpus(cfg.data), cfg.data.split)["train"]
    streams = Streams(corpus, cfg.data.batch_size, cfg.tbptt.window)
    V, E, H = BYTES.vocab_size, cfg.model.embedding_size, cfg.model.hidden_size
    embedding, lstm, head = nn.Embedding(V, E), nn.LSTM(E, H, batch_first=True), nn.Linear(H, V)
    params = [*embedding.parameters(), *lstm.parameters(), *head.parameters()]
    betas = tuple(cfg.optim.optimizer["betas"])
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=betas)
    steps, warmup = cfg.trainer.max_steps, cfg.optim.schedule["warmup_steps"]
    min_lr = cfg.optim.schedule["min_lr_ratio"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, min_lr, steps)
    )
    state, tokens = None, 0
    start = time.perf_counter()
    for step in range(steps):
        w = streams[step % len(streams)]
        h, state = lstm(embedding(w.inputs), state)  # (B, T, H)
        logits = head(h)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), w.targets.flatten())
        loss.backward()
        state = tuple(s.detach() for s in state)
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        tokens += w.targets.numel()
        loss.item()  # a plain loop reads its loss too (progress, logging)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="updates per run")
    parser.add_argument("--reps", type=int, default=5, help="interleaved pairs of runs")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="3 pairs of 10 updates, hidden 128")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_tbptt.md")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.reps, args.hidden = 10, 3, 128
    overrides = config(args.steps, args.hidden)
    run_seqtrain(config(3, args.hidden))  # warm caches and imports once, untimed
    pairs = []
    for rep in range(args.reps):
        order = [("seqtrain", run_seqtrain), ("plain", run_plain)]
        if rep % 2:
            order.reverse()  # alternate who goes first
        result = {name: fn(overrides) for name, fn in order}
        pairs.append(result)
        ratio = result["seqtrain"] / result["plain"]
        print(
            f"[{rep + 1}/{args.reps}] seqtrain {result['seqtrain']:,.0f} tok/s, "
            f"plain {result['plain']:,.0f} tok/s, ratio {ratio:.3f}",
            flush=True,
        )
    ratios = [p["seqtrain"] / p["plain"] for p in pairs]
    median = statistics.median(ratios)
    lines = [
        "# seqtrain vs a plain PyTorch TBPTT loop",
        "",
        f"`python scripts/bench_tbptt.py --steps {args.steps} --reps {args.reps} "
        f"--hidden {args.hidden}`: LSTM 1 x {args.hidden}, batch 32, window 128, "
        f"{args.steps} updates per run, {args.reps} interleaved pairs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| pair | seqtrain tok/s | plain tok/s | ratio |",
        "| --- | --- | --- | --- |",
        *(
            f"| {i + 1} | {p['seqtrain']:,.0f} | {p['plain']:,.0f} | {r:.3f} |"
            for i, (p, r) in enumerate(zip(pairs, ratios, strict=True))
        ),
        "",
        f"Median ratio: **{median:.3f}** (target: at least 0.95).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    spread = f"min {min(ratios):.3f}, max {max(ratios):.3f}"
    print(f"median ratio {median:.3f} ({spread}); wrote {args.out}")
    if not math.isfinite(median):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
