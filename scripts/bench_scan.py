"""Training throughput of the scan cells, scan form against step form and against nn.LSTM.

    python scripts/bench_scan.py                 # T = 128, 512, 2048, 8192, hidden 256
    python scripts/bench_scan.py --quick         # T = 128, 512, hidden 64, 3 repetitions
    python scripts/bench_scan.py --device cuda

One update = forward + backward of a one-layer stack over a (B, T, H) window with a carried state,
as the TBPTT engine runs it; tokens/s = B * T / its median time. Each nn.LSTM has about the
parameter count of the scan cell it is compared with (cuDNN on GPU, oneDNN on CPU). Timings on a
shared machine drift, so at each T every variant runs once per repetition in a rotating order and
the median is taken. Also measures, per T, the float32 error of the log-space (Heinsen) scan that
scan.py does not use, next to scan.py's. Writes docs/bench_scan.md and docs/bench_scan.png.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from bench_cells import step as update
from torch import Tensor, nn

from seqtrain.cells.scan import SCAN_CELLS, ScanStack, linear_scan
from seqtrain.memory import cache_host_memory


def lstm_hidden(params: int, input_size: int) -> int:
    """The nn.LSTM hidden size with about `params` parameters: 4 H (I + H) + 8 H = params."""
    b = input_size + 2
    return max(1, round((-b + math.sqrt(b * b + params)) / 2))


def variants(hidden: int, device: torch.device) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for cell in SCAN_CELLS:
        for form in ("scan", "step"):
            torch.manual_seed(0)
            out[f"{cell} {form}"] = ScanStack(cell, hidden, hidden, 1, form).to(device)
        params = sum(p.numel() for p in out[f"{cell} scan"].parameters())
        H = lstm_hidden(params, hidden)
        out.setdefault(f"nn.LSTM H={H}", nn.LSTM(hidden, H, batch_first=True).to(device))
    return out


def bench_window(T: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    B, H = args.batch, args.hidden
    modules = {
        label: m
        for label, m in variants(H, device).items()
        if not (label.endswith(" step") and args.step_max_t and args.step_max_t < T)
    }
    x = torch.randn(B, T, H, device=device, requires_grad=True)

    def state_for(m: nn.Module) -> tuple[Tensor, ...]:
        if isinstance(m, nn.LSTM):
            return tuple(torch.zeros(1, B, m.hidden_size, device=device) for _ in range(2))
        return tuple(torch.zeros(s, device=device) for s in m.state_shapes(B))

    states = {label: state_for(m) for label, m in modules.items()}
    for label, m in modules.items():  # warm-up
        update(m, x, states[label], device)
    labels = list(modules)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for rep in range(args.reps):
        for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
            times[label].append(update(modules[label], x, states[label], device))
    rows = []
    for label in labels:
        t = statistics.median(times[label])
        params = sum(p.numel() for p in modules[label].parameters())
        rows.append(dict(T=T, variant=label, params=params, tokens_s=B * T / t, seconds=t))
        print(f"T={T:5d} {label:16s} {params:8d} params {B * T / t:10.0f} tok/s", flush=True)
    return rows


def log_space_error(T: int, hidden: int = 64) -> tuple[float, float]:
    """Max relative error in float32 of minGRU's states, the log-space (Heinsen) scan and
    scan.py's, against float64, with gate pre-activations of spread 4 (some saturated)."""
    g = torch.Generator().manual_seed(0)
    k_z = 4 * torch.randn(1, T, hidden, generator=g, dtype=torch.float64)
    k_h = torch.randn(1, T, hidden, generator=g, dtype=torch.float64)
    log_a = -F.softplus(k_z)
    log_b = -F.softplus(-k_z) + torch.where(k_h >= 0, k_h + 0.5, torch.sigmoid(k_h)).log()
    h0 = torch.zeros(1, hidden, dtype=torch.float64)
    exact = linear_scan(log_a.exp(), log_b.exp(), h0)
    la, lb = log_a.float(), log_b.float()
    A = la.cumsum(1)  # (1, T, H)
    heinsen = (A + torch.logcumsumexp(lb - A, 1)).exp()
    chunked = linear_scan(la.exp(), lb.exp(), h0.float())
    return tuple(((h.double() - exact).abs() / exact).max().item() for h in (heinsen, chunked))


def write_markdown(rows: list[dict], errors: dict[int, tuple[float, float]], args, device, path):
    threads = torch.get_num_threads()
    windows = sorted({r["T"] for r in rows})
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["T"], r["variant"]): r for r in rows}
    lines = [
        "# Scan cell benchmark",
        "",
        f"`python scripts/bench_scan.py{' --quick' if args.quick else ''}"
        f"{' --device cuda' if device.type == 'cuda' else ''}` on {device.type} "
        f"({platform.processor() or platform.machine()}, {threads} threads, torch "
        f"{torch.__version__}); batch {args.batch}, input size = hidden = {args.hidden}, one "
        f"layer, forward + backward, median of {args.reps} interleaved repetitions.",
        "",
        "Training tokens/s (B * T / seconds per update); nn.LSTM rows have about the parameter "
        "count of the scan cell beside them (params column per variant below).",
        "",
        "| T | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for T in windows:
        values = [f"{cell[T, lb]['tokens_s']:.0f}" if (T, lb) in cell else "–" for lb in labels]
        lines.append(f"| {T} | " + " | ".join(values) + " |")
    params = {r["variant"]: r["params"] for r in rows}
    lines += ["", "| variant | params |", "|---|---|"]
    lines += [f"| {lb} | {params[lb]} |" for lb in labels]
    lines += [
        "",
        "Scan form over step form (same cell, same T):",
        "",
        "| T | " + " | ".join(SCAN_CELLS) + " |",
        "|---|" + "---|" * len(SCAN_CELLS),
    ]
    for T in windows:
        ratios = [
            f"{cell[T, f'{c} scan']['tokens_s'] / cell[T, f'{c} step']['tokens_s']:.1f}x"
            if (T, f"{c} step") in cell
            else "–"
            for c in SCAN_CELLS
        ]
        lines.append(f"| {T} | " + " | ".join(ratios) + " |")
    lines += [
        "",
        "Why scan.py does not use the log-space (Heinsen) scan: max relative error of minGRU's "
        "states in float32 against float64 (gate pre-activations N(0, 4^2), H = 64):",
        "",
        "| T | log-space scan | scan.py (chunked, linear) |",
        "|---|---|---|",
    ]
    lines += [f"| {T} | {e[0]:.1e} | {e[1]:.1e} |" for T, e in sorted(errors.items())]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["variant"] for r in rows):
        points = sorted((r["T"], r["tokens_s"]) for r in rows if r["variant"] == label)
        style = "--" if label.endswith("step") else (":" if label.startswith("nn.") else "-")
        ax.plot(*zip(*points, strict=True), style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("window T")
    ax.set_ylabel("training tokens/s")
    ax.set_title("forward + backward throughput (median of interleaved repetitions)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T 128, 512; hidden 64; 3 reps")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--step-max-t", type=int, default=None, help="skip step forms above")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    cache_host_memory()  # as training runs (memory.host_cache)
    args.reps = args.reps or (3 if args.quick else 7)
    args.hidden = args.hidden or (64 if args.quick else 256)
    device = torch.device(args.device)
    windows = (128, 512) if args.quick else (128, 512, 2048, 8192)
    rows = [row for T in windows for row in bench_window(T, args, device)]
    errors = {T: log_space_error(T) for T in windows}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_markdown(rows, errors, args, device, args.out / f"bench_scan{suffix}.md")
    write_plot(rows, args.out / f"bench_scan{suffix}.png")
    print(f"wrote {args.out / f'bench_scan{suffix}.md'} and .png", flush=True)


if __name__ == "__main__":
    main()
