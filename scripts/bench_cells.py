"""Forward+backward speed of every cell backend as a ratio to cudnn, and saved-for-backward bytes.

    python scripts/bench_cells.py            # full grid: lstm/gru x hidden 256/512 x layers 1/2
    python scripts/bench_cells.py --quick    # hidden 512, 1 layer, fewer repetitions
    python scripts/bench_cells.py --device cuda

Timings on a shared machine drift, so backends are timed interleaved (one run of each, in a
rotating order, per repetition) and each ratio is the median over repetitions of the per-repetition
ratio to cudnn. Like training (memory.host_cache), it keeps freed CPU memory for reuse;
--no-host-cache measures glibc's default. Writes docs/bench_cells.md and docs/bench_cells.png.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from seqtrain.cells import build_recurrent, kernel_name
from seqtrain.memory import cache_host_memory

# (label, backend, options): the layer-normed row is compared with plain cudnn, as the issue asks.
VARIANTS = [
    ("cudnn", "cudnn", {}),
    ("jit", "jit", {}),
    ("modular", "modular", {}),
    ("compile", "compile", {}),
    ("modular+layernorm", "modular", {"layernorm": True}),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(module: nn.Module, x: Tensor, state: tuple[Tensor, ...], device: torch.device) -> float:
    """Seconds for one forward+backward over a window, as the TBPTT engine runs it."""
    sync(device)
    start = time.perf_counter()
    y, final = module(x, state)
    (y.float().square().mean() + sum(s.float().sum() for s in final)).backward()
    sync(device)
    return time.perf_counter() - start


def saved_bytes(module: nn.Module, x: Tensor, state: tuple[Tensor, ...]) -> int:
    """Bytes autograd keeps for backward, each storage counted once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = module(x, state)
    del y
    return sum(seen.values())


def bench_config(
    cell: str, hidden: int, layers: int, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    torch.manual_seed(0)
    B, T = args.batch, args.window
    modules = {}
    for label, backend, options in VARIANTS:
        module = build_recurrent(backend, cell, hidden, hidden, layers, **options).to(device)
        if modules:  # same weights everywhere: the comparison is about kernels, not values
            module.load_state_dict(modules["cudnn"].state_dict(), strict=False)
        modules[label] = module.train()
    x = torch.randn(B, T, hidden, device=device, requires_grad=True)
    n_state = 2 if cell == "lstm" else 1
    state = tuple(torch.randn(layers, B, hidden, device=device) for _ in range(n_state))
    first = {label: step(m, x, state, device) for label, m in modules.items()}  # compiles
    for m in modules.values():
        step(m, x, state, device)
    times: dict[str, list[float]] = {label: [] for label in modules}
    ratios: dict[str, list[float]] = {label: [] for label in modules}
    labels = list(modules)
    for rep in range(args.reps):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        this = {label: step(modules[label], x, state, device) for label in order}
        for label in labels:
            times[label].append(this[label])
            ratios[label].append(this["cudnn"] / this[label])
    rows = []
    for label in labels:
        t = statistics.median(times[label])
        per_unit = saved_bytes(modules[label], x, state) / (T * B * hidden * layers)
        row = dict(
            cell=cell,
            hidden=hidden,
            layers=layers,
            variant=label,
            kernel=kernel_name(modules[label], device),
            tokens_s=B * T / t,
            ratio=statistics.median(ratios[label]),
            ratio_lo=min(ratios[label]),
            ratio_hi=max(ratios[label]),
            saved=per_unit,
            first_s=first[label],
        )
        print(
            f"{cell} H={hidden} L={layers} {label:18s} {row['tokens_s']:9.0f} tok/s  "
            f"{row['ratio']:.2f}x cudnn  saved {per_unit:5.1f} B/(step*b*h)  "
            f"first call {row['first_s']:.1f}s",
            flush=True,
        )
        rows.append(row)
    return rows


def write_markdown(rows: list[dict], args: argparse.Namespace, device: torch.device, path: Path):
    threads = torch.get_num_threads()
    lines = [
        "# Cell backend benchmark",
        "",
        f"`python scripts/bench_cells.py{' --quick' if args.quick else ''}"
        f"{' --device cuda' if device.type == 'cuda' else ''}"
        f"{' --no-host-cache' if not args.host_cache else ''}` on {device.type} "
        f"({platform.processor() or platform.machine()}, {threads} threads, torch "
        f"{torch.__version__}); batch {args.batch}, window {args.window}, input size = hidden, "
        f"forward + backward, {args.reps} interleaved repetitions, host memory cache "
        f"{'on (memory.host_cache, as training runs)' if args.host_cache else 'off'}.",
        "",
        "ratio = median over repetitions of (cudnn time / backend time) in the same repetition "
        "(range in brackets); saved = bytes autograd keeps for backward per step, batch element, "
        "hidden unit and layer (float32: divide by 4 for floats; parameters excluded, the window's "
        "input included); first call = the first forward+backward, which for compile includes "
        "compilation.",
        "",
        "| cell | hidden | layers | backend | kernel | tokens/s | ratio to cudnn | saved B | "
        "first call s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['hidden']} | {r['layers']} | {r['variant']} | {r['kernel']} | "
            f"{r['tokens_s']:.0f} | {r['ratio']:.2f} ({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f}) | "
            f"{r['saved']:.1f} | {r['first_s']:.1f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    configs = sorted({(r["cell"], r["hidden"], r["layers"]) for r in rows})
    labels = [label for label, _, _ in VARIANTS]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4))
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        values = [
            next(
                r["ratio"]
                for r in rows
                if (r["cell"], r["hidden"], r["layers"]) == c and r["variant"] == label
            )
            for c in configs
        ]
        ax.bar([i + k * width for i in range(len(configs))], values, width, label=label)
    ax.axhline(0.7, color="grey", linestyle="--", linewidth=1, label="target, no options")
    ax.axhline(0.6, color="tab:purple", linestyle=":", linewidth=1, label="target, layernorm")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"{c} H{h} L{n}" for c, h, n in configs])
    ax.set_ylabel("tokens/s relative to cudnn")
    ax.set_title("forward+backward throughput (median of interleaved repetitions)")
    ax.legend(fontsize=8, ncol=len(labels))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 512, 1 layer, 5 reps")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--no-host-cache",
        dest="host_cache",
        action="store_false",
        help="leave glibc's malloc as it is (training sets memory.host_cache=true)",
    )
    args = parser.parse_args()
    if args.host_cache:
        cache_host_memory()
    args.reps = args.reps or (5 if args.quick else 9)
    device = torch.device(args.device)
    hiddens, layer_counts = ([512], [1]) if args.quick else ([256, 512], [1, 2])
    rows = []
    for cell in ("lstm", "gru"):
        for hidden in hiddens:
            for layers in layer_counts:
                rows += bench_config(cell, hidden, layers, args, device)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_markdown(rows, args, device, args.out / f"bench_cells{suffix}.md")
    write_plot(rows, args.out / f"bench_cells{suffix}.png")
    print(f"wrote {args.out / f'bench_cells{suffix}.md'} and .png", flush=True)


if __name__ == "__main__":
    main()
