"""Training throughput of the scan cells against nn.LSTM: issue #27's targets, and a sweep over T.

    python scripts/bench_scan.py                 # targets at T = 1024, then T = 128 ... 8192
    python scripts/bench_scan.py --targets-only  # only the targets table (a few minutes)
    python scripts/bench_scan.py --quick         # small sizes, 3 repetitions: checks it runs
    python scripts/bench_scan.py --device cuda

The targets (B = 32, T = 1024, input 512, forward + backward): minGRU at nn.LSTM's hidden size
(512; a quarter of its FLOPs) >= 3x nn.LSTM's tokens/s; minGRU at its parameter count (H = 2048)
>= 1.0x; residual minGRU blocks at its parameter count >= 0.8x; Gated DeltaNet at its parameter
count >= 1.0x (an mLSTM row beside it, without a target). Every row also gets the GFLOP/s its
matrix products reach (3x the forward's multiply-adds per token, backward included; a
matrix-state layer's chunk work counted) against this machine's measured float32 GEMM rate.

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
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from bench_cells import step as update
from bench_cells import sync
from torch import Tensor, nn

from seqtrain.cells import build_recurrent
from seqtrain.cells.blocks import residual_stack
from seqtrain.cells.matrix import MatrixLayer
from seqtrain.cells.scan import SCAN_CELLS, ScanStack, linear_scan
from seqtrain.memory import cache_host_memory


def lstm_hidden(params: int, input_size: int) -> int:
    """The nn.LSTM hidden size with about `params` parameters: 4 H (I + H) + 8 H = params."""
    b = input_size + 2
    return max(1, round((-b + math.sqrt(b * b + params)) / 2))


def variants(hidden: int, device: torch.device) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for cell in SCAN_CELLS:
        for form in ("blocked", "scan", "step"):
            torch.manual_seed(0)
            out[f"{cell} {form}"] = ScanStack(cell, hidden, hidden, 1, form).to(device)
        params = sum(p.numel() for p in out[f"{cell} blocked"].parameters())
        H = lstm_hidden(params, hidden)
        out.setdefault(f"nn.LSTM H={H}", nn.LSTM(hidden, H, batch_first=True).to(device))
    return out


def state_of(m: nn.Module, batch: int, device: torch.device) -> tuple[Tensor, ...]:
    """A zero carried state of the module's layout."""
    if isinstance(m, nn.LSTM):
        return tuple(torch.zeros(1, batch, m.hidden_size, device=device) for _ in range(2))
    return tuple(torch.zeros(s, device=device) for s in m.state_shapes(batch))


def interleaved(
    modules: dict[str, nn.Module], x: Tensor, states: dict, reps: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per update of every module, `reps` times each, in an order rotated every time."""
    labels = list(modules)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for rep in range(reps):
        for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
            times[label].append(update(modules[label], x, states[label], device))
    return times


def bench_window(T: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    B, H = args.batch, args.hidden
    modules = {
        label: m
        for label, m in variants(H, device).items()
        if not (label.endswith(" step") and args.step_max_t and args.step_max_t < T)
    }
    x = torch.randn(B, T, H, device=device, requires_grad=True)
    states = {label: state_of(m, B, device) for label, m in modules.items()}
    for label, m in modules.items():  # warm-up
        update(m, x, states[label], device)
    times = interleaved(modules, x, states, args.reps, device)
    rows = []
    for label in modules:
        t = statistics.median(times[label])
        params = sum(p.numel() for p in modules[label].parameters())
        rows.append(dict(T=T, variant=label, params=params, tokens_s=B * T / t, seconds=t))
        print(f"T={T:5d} {label:16s} {params:8d} params {B * T / t:10.0f} tok/s", flush=True)
    return rows


TARGETS = {  # variant -> (the nn.LSTM ratio it must reach, what it is)
    "minGRU H=512": (3.0, "LSTM's hidden size, a quarter of its FLOPs"),
    "minGRU H=2048": (1.0, "LSTM's parameter count"),
    "residual minGRU": (0.8, "2 residual blocks at LSTM's parameter count"),
    "GDN": (1.0, "Gated DeltaNet at LSTM's parameter count"),
}
MATRIX_HEAD = 64  # head size of the matrix-state rows: heads of (64, 64) states


def matrix_stack(
    cell: str, params: int, input_size: int, head: int, backend: str = "modular"
) -> nn.Module:
    """One `cell` layer (gdn, mlstm) whose width, a multiple of `head`, gives the parameter count
    nearest `params`."""

    def build(width: int) -> nn.Module:
        return build_recurrent(backend, cell, input_size, width, 1, num_heads=max(1, width // head))

    widths = range(head, 4 * input_size + 1, head)
    best = min(widths, key=lambda w: abs(sum(p.numel() for p in build(w).parameters()) - params))
    return build(best)


def residual_width(params: int, input_size: int, blocks: int = 2) -> int:
    """The width W of `blocks` residual minGRU blocks with about `params` parameters: per block
    2 W^2 (core) + 9 W^2 (GeGLU MLP, expansion 3), plus the input projection I W."""
    return round((-input_size + math.sqrt(input_size**2 + 44 * blocks * params)) / (22 * blocks))


def forward_flops_per_token(module: nn.Module) -> int:
    """Multiply-adds x 2 of every matrix product per token: nn.Linear and nn.LSTM weights, and a
    matrix-state layer's chunk work per head (the reads and writes of the (d, d) state, 3 d^2,
    and the (c, c) products and triangular solve, about 4 c d)."""
    flops = 0
    chunk = getattr(module, "chunk", 0)
    for m in module.modules():
        if isinstance(m, MatrixLayer):
            d = m.head_size
            flops += 2 * m.num_heads * (3 * d * d + 4 * chunk * d)
        elif isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features
        elif isinstance(m, nn.LSTM):
            flops += sum(
                2 * p.shape[0] * p.shape[1] for n, p in m.named_parameters() if "weight" in n
            )
    return flops


def gemm_gflops(device: torch.device, n: int = 2048, reps: int = 7) -> float:
    """This machine's float32 GEMM rate: the median of n x n x n products."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def target_variants(device: torch.device, size: int) -> dict[str, nn.Module]:
    """nn.LSTM at `size` and the scan rows the targets compare with it (and the chunked scan)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(size, size, batch_first=True)
    params = sum(p.numel() for p in lstm.parameters())
    wide = 4 * size  # minGRU's 2 H (I + 1) parameters = nn.LSTM's 4 H (I + H) + 8 H exactly
    width = residual_width(params, size)
    out = {
        f"nn.LSTM H={size}": lstm,
        f"minGRU H={size}": ScanStack("mingru", size, size),
        f"minGRU H={size} chunked": ScanStack("mingru", size, size, form="scan"),
        f"minGRU H={wide}": ScanStack("mingru", size, wide),
        f"minGRU H={wide} chunked": ScanStack("mingru", size, wide, form="scan"),
        f"minGRU H={size} compile": ScanStack("mingru", size, size, backend="compile"),
        f"minGRU H={wide} compile": ScanStack("mingru", size, wide, backend="compile"),
        "residual minGRU": residual_stack(
            lambda: ScanStack("mingru", width, width), size, width, 2
        ),
        "residual minGRU compile": residual_stack(
            lambda: ScanStack("mingru", width, width, backend="compile"), size, width, 2, fused=True
        ),
        "GDN": matrix_stack("gdn", params, size, min(MATRIX_HEAD, size)),
        "GDN compile": matrix_stack("gdn", params, size, min(MATRIX_HEAD, size), "compile"),
        "mLSTM": matrix_stack("mlstm", params, size, min(MATRIX_HEAD, size)),
        "mLSTM compile": matrix_stack("mlstm", params, size, min(MATRIX_HEAD, size), "compile"),
    }
    return {label: m.to(device) for label, m in out.items()}


def bench_targets(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], float]:
    """Every target variant at (B, T, I) = (32, 1024, 512) (smaller with --quick), interleaved."""
    size, T = (64, 128) if args.quick else (512, 1024)
    modules = target_variants(device, size)
    x = torch.randn(args.batch, T, size, device=device, requires_grad=True)
    states = {label: state_of(m, args.batch, device) for label, m in modules.items()}
    for label, m in modules.items():  # warm-up
        update(m, x, states[label], device)
    times = interleaved(modules, x, states, args.reps, device)
    gemm = gemm_gflops(device)
    rows = []
    for label, m in modules.items():
        t = statistics.median(times[label])
        tokens_s = args.batch * T / t
        gflops = 3 * forward_flops_per_token(m) * tokens_s / 1e9
        params = sum(p.numel() for p in m.parameters())
        rows.append(dict(variant=label, params=params, tokens_s=tokens_s, gflops=gflops))
        print(f"{label:24s} {params:9,d} params {tokens_s:10,.0f} tok/s {gflops:6.1f} GFLOP/s")
    return rows, gemm


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


def targets_markdown(rows: list[dict], gemm: float, args, device) -> list[str]:
    """The targets table: tokens/s, the ratio to nn.LSTM, GFLOP/s against the GEMM rate."""
    lstm = rows[0]
    size = 64 if args.quick else 512
    lines = [
        "## Targets (issue #27)",
        "",
        f"B = {args.batch}, T = {128 if args.quick else 1024}, input {size}, one update = forward "
        f"+ backward, median of {args.reps} interleaved repetitions. GFLOP/s counts the matrix "
        "products only (3x the forward's per token); this machine's float32 GEMM (2048^3) ran at "
        f'{gemm:.0f} GFLOP/s. `chunked` rows are the previous scan (`form="scan"`); `compile` rows '
        "run `model.backend=compile` (compiled gate math; in residual blocks also the norms, MLP "
        "and adds), compiled during the warm-up.",
        "",
        "| variant | params | tokens/s | vs nn.LSTM | target | GFLOP/s | of GEMM |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for row in rows:
        ratio = row["tokens_s"] / lstm["tokens_s"]
        name = row["variant"].replace(f"H={size}", "H=512").replace(f"H={4 * size}", "H=2048")
        target = TARGETS.get(name.removesuffix(" compile"))  # either backend may reach it
        verdict = ""
        if target and not args.quick:
            verdict = f">= {target[0]}x ({'PASS' if ratio >= target[0] else 'FAIL'})"
        lines.append(
            f"| {row['variant']} | {row['params']:,} | {row['tokens_s']:,.0f} | {ratio:.2f}x | "
            f"{verdict} | {row['gflops']:.1f} | {row['gflops'] / gemm:.0%} |"
        )
    return lines + [""]


def write_markdown(
    rows: list[dict], errors: dict[int, tuple[float, float]], args, device, path, targets
):
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
        f"{torch.__version__}).",
        "",
        *targets,
        "## Over the window length",
        "",
        f"Batch {args.batch}, input size = hidden = {args.hidden}, one layer, forward + backward, "
        f"median of {args.reps} interleaved repetitions.",
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
        "Blocked form over the chunked scan form, and over the step form (same cell, same T):",
        "",
        "| T | " + " | ".join(f"{c} / scan | {c} / step" for c in SCAN_CELLS) + " |",
        "|---|" + "---|---|" * len(SCAN_CELLS),
    ]
    for T in windows:
        ratios = [
            f"{cell[T, f'{c} blocked']['tokens_s'] / cell[T, f'{c} {form}']['tokens_s']:.1f}x"
            if (T, f"{c} {form}") in cell
            else "–"
            for c in SCAN_CELLS
            for form in ("scan", "step")
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
    parser.add_argument("--targets-only", action="store_true", help="print the targets table")
    args = parser.parse_args()
    cache_host_memory()  # as training runs (memory.host_cache)
    args.reps = args.reps or (3 if args.quick else 7)
    args.hidden = args.hidden or (64 if args.quick else 256)
    device = torch.device(args.device)
    target_rows, gemm = bench_targets(args, device)
    targets = targets_markdown(target_rows, gemm, args, device)
    print("\n".join(targets), flush=True)
    if args.targets_only:
        return
    windows = (128, 512) if args.quick else (128, 512, 2048, 8192)
    rows = [row for T in windows for row in bench_window(T, args, device)]
    errors = {T: log_space_error(T) for T in windows}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    write_markdown(rows, errors, args, device, args.out / f"bench_scan{suffix}.md", targets)
    write_plot(rows, args.out / f"bench_scan{suffix}.png")
    print(f"wrote {args.out / f'bench_scan{suffix}.md'} and .png", flush=True)


if __name__ == "__main__":
    main()
