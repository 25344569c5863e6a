"""Memory and time of one full-BPTT update against the sequence length, per checkpointing plan.

For T = 128 ... 8192 (tbptt.window = T: the whole sequence is one update), hidden 512, batch 32,
2 LSTM layers (the cudnn backend), three plans:
    none          every step's activations kept;
    chunk sqrt(T) memory.checkpoint=chunk with chunk = ceil(sqrt(T)) (= auto without a budget);
    auto          memory.checkpoint=auto under one fixed memory.budget for every T.
Per plan and T: saved bytes (saved_tensors_hooks) and peak bytes of one update (CUDA allocator
or the CPU profiler), and step time. Times are interleaved repetitions; a ratio is the median of
per-repetition ratios to `none` in the same repetition, so machine noise hits both sides alike.
Where `none` would not fit in --none-limit it is not run: its bytes are extrapolated (marked).
At T >= --big the step time comes from the single profiled update (noted in the table).

A large-vocabulary case follows: an LM over V = 32,768 symbols (random tokens, as the probe draws
them), where the (B, T, V) log-softmax and its gradients, not the LSTM, fill the memory. Per head
(linear, linear tied to the embedding, adaptive): `none` and `auto` under --vocab-budget, with the
shape model's first guess and what a model of the stack alone would have chosen.

    python scripts/bench_memory.py                # ~9 minutes on 2 quiet CPU cores
    python scripts/bench_memory.py --quick        # ~1 minute: small model, T = 64 ... 512
    python scripts/bench_memory.py --vocab-only   # < 1 minute: the V = 32,768 case alone
Writes docs/bench_memory.{md,png,json} (--quick: outputs/bench_memory/); --render JSON redraws;
--vocab-only puts its case into the JSON already there and redraws the rest from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from seqtrain.data import BYTES, DataSpec
from seqtrain.memory import (
    MemoryConfig,
    MemoryModel,
    Usage,
    format_size,
    head_elements_per_step,
    measure_update,
    parse_size,
    plan_memory,
)
from seqtrain.model import ModelConfig, RecurrentModel
from seqtrain.tasks import TaskConfig, build_model, build_task
from seqtrain.tbptt import Engine

ROOT = Path(__file__).resolve().parents[1]
V = BYTES.vocab_size
PLANS = ("none", "chunk", "auto")
TARGET_T = 2048
TASK = build_task(TaskConfig(), DataSpec("tokens", V, V))  # byte-level LM
# The large-vocabulary case: one LSTM layer, E = H, random tokens over V symbols. --quick: smaller.
VOCAB = {"vocab": 32768, "hidden": 256, "batch": 4, "window": 256, "cutoffs": [2000, 10000]}
VOCAB_QUICK = {"vocab": 4096, "hidden": 64, "batch": 4, "window": 64, "cutoffs": [500, 1500]}


def say(message: str) -> None:
    print(message, flush=True)


def timed_update(engine: Engine, x: torch.Tensor, y: torch.Tensor, chunk: int | None) -> dict:
    """Wall seconds, system seconds and minor page faults of one forward + backward."""
    resets = torch.zeros_like(x, dtype=torch.bool)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    loss = engine.run(x, y, resets, None, chunk=chunk).loss
    (loss / x.numel()).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    engine.model.zero_grad(set_to_none=True)
    return {
        "seconds": seconds,
        "sys_seconds": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
    }


def bench_length(args: argparse.Namespace, model: RecurrentModel, T: int, none_fit: dict) -> dict:
    """All plans at one sequence length; none_fit extrapolates `none` beyond --none-limit."""
    device = next(model.parameters()).device
    engine = Engine(model, TASK, T)
    budget = parse_size(args.budget)
    sqrt_chunk = math.ceil(math.sqrt(T))
    measured: dict[int | None, Usage] = {}

    def measure(chunk: int | None) -> Usage:
        if chunk not in measured:
            measured[chunk] = measure_update(engine, args.batch, T, chunk)
        return measured[chunk]

    rows: dict[str, dict] = {}
    shape = MemoryModel.from_shapes(model, args.batch, T)
    predicted_none = none_fit.get("peak_per_state", shape.step_peak) * (T + 1)
    run_none = predicted_none <= parse_size(args.none_limit)
    chunks: dict[str, int | None] = {"chunk": sqrt_chunk}
    if run_none:
        chunks["none"] = None
    usage = measure(sqrt_chunk)
    rows["chunk"] = {"chunk": sqrt_chunk, **vars(usage)}
    say(
        f"[T={T}] chunk {sqrt_chunk}: saved {format_size(usage.saved_bytes)}, "
        f"peak {format_size(usage.peak_bytes)} ({usage.seconds:.1f} s profiled)"
    )
    plan = plan_memory(
        MemoryConfig("auto", budget=args.budget),
        engine,
        args.batch,
        say=lambda line: say(f"[T={T}]   planner: {line}"),
        measured=measured,
    )
    chunks["auto"] = plan.chunk
    rows["auto"] = {"chunk": plan.chunk, **vars(measure(plan.chunk)), "plan": plan.as_dict()}
    if run_none:
        usage = measure(None)
        rows["none"] = {"chunk": None, **vars(usage)}
        none_fit["saved_per_state"] = usage.saved_bytes / (T + 1)
        none_fit["peak_per_state"] = usage.peak_bytes / (T + 1)
        say(
            f"[T={T}] none: saved {format_size(usage.saved_bytes)}, "
            f"peak {format_size(usage.peak_bytes)} ({usage.seconds:.1f} s profiled)"
        )
    else:
        rows["none"] = {
            "chunk": None,
            "saved_bytes": round(none_fit["saved_per_state"] * (T + 1)),
            "peak_bytes": round(none_fit["peak_per_state"] * (T + 1)),
            "extrapolated": True,
        }
        say(
            f"[T={T}] none: not run (predicted peak {format_size(predicted_none)} > "
            f"--none-limit {args.none_limit}); bytes extrapolated from the largest measured T"
        )

    reps = args.reps if args.big > T else 0
    if T == TARGET_T:
        reps = max(reps, args.target_reps)
    if reps:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, V, (args.batch, T), device=device, generator=g)  # (B, T)
        y = torch.randint(0, V, (args.batch, T), device=device, generator=g)  # (B, T)
        order = [p for p in PLANS if p in chunks]
        for plan_name in order:  # warm-up: first-call costs (allocator, oneDNN primitives)
            timed_update(engine, x, y, chunks[plan_name])
        times: dict[str, list[dict]] = {p: [] for p in order}
        for rep in range(reps):
            for plan_name in order:
                times[plan_name].append(timed_update(engine, x, y, chunks[plan_name]))
            say(
                f"[T={T}] timing rep {rep + 1}/{reps}: "
                + ", ".join(f"{p} {times[p][-1]['seconds']:.2f} s" for p in order)
            )
        for plan_name in order:
            runs = times[plan_name]
            rows[plan_name]["seconds"] = statistics.median(r["seconds"] for r in runs)
            rows[plan_name]["sys_seconds"] = statistics.median(r["sys_seconds"] for r in runs)
            rows[plan_name]["faults"] = statistics.median(r["faults"] for r in runs)
            rows[plan_name]["reps"] = reps
            if "none" in times:
                ratios = [
                    r["seconds"] / n["seconds"] for r, n in zip(runs, times["none"], strict=True)
                ]
                rows[plan_name]["time_ratio"] = statistics.median(ratios)
                rows[plan_name]["time_ratio_range"] = [min(ratios), max(ratios)]
    else:
        for plan_name in chunks:
            rows[plan_name]["reps"] = 0  # time = the profiled update's
    for plan_name in PLANS:
        row = rows[plan_name]
        if row.get("extrapolated"):
            continue
        none = rows["none"]
        row["saved_ratio"] = row["saved_bytes"] / none["saved_bytes"]
        row["peak_ratio"] = row["peak_bytes"] / none["peak_bytes"]
    return {"T": T, "budget_bytes": budget, "plans": rows}


def bench_vocab(case: dict, budget: str, device: str) -> dict:
    """Per head (linear, linear tied to the embedding, adaptive): `none` and `auto` under
    `budget` measured, with the shape model's prediction and the chunk a model of the stack
    alone (no head terms) would fit."""
    V = case["vocab"]
    task = build_task(TaskConfig(), DataSpec("tokens", V, V))
    heads = [("linear", [], False), ("linear", [], True), ("adaptive", case["cutoffs"], False)]
    rows = [bench_head(task, case, *head, budget, device) for head in heads]
    return {**case, "budget": budget, "budget_bytes": parse_size(budget), "rows": rows}


def bench_head(
    task,
    case: dict,
    head: str,
    cutoffs: list,
    tied: bool,
    budget: str,
    device: str,
) -> dict:
    """One head of the large-vocabulary case."""
    V, T, B, H = case["vocab"], case["window"], case["batch"], case["hidden"]
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=H, hidden_size=H, head=head, cutoffs=cutoffs, tie_weights=tied)
    model = build_model(cfg, task).to(device)
    engine = Engine(model, task, T)
    shapes = MemoryModel.from_shapes(model, B, T)
    f = next(model.parameters()).element_size()
    head_saved, head_peak = (f * n for n in head_elements_per_step(model.head, B))
    stack_only = dataclasses.replace(
        shapes, step_saved=shapes.step_saved - head_saved, step_peak=shapes.step_peak - head_peak
    )
    measured: dict[int | None, Usage] = {}  # by chunk: the planner's probes, then ours

    def usage(chunk: int | None) -> Usage:
        if chunk not in measured:
            measured[chunk] = measure_update(engine, B, T, chunk)
        return measured[chunk]

    plan = plan_memory(
        MemoryConfig("auto", budget=budget),
        engine,
        B,
        say=lambda line: say(f"[V={V} {head}{' tied' * tied}] planner: {line}"),
        measured=measured,
    )
    none = usage(None)
    stack_chunk = stack_only.fit(parse_size(budget))
    stack = usage(stack_chunk)
    name = f"{head}{' tied' * tied}"
    say(
        f"[V={V} {name}] none: peak {format_size(none.peak_bytes)}; auto ({budget}): "
        f"{_chunk_name(plan.chunk)}, peak {format_size(plan.peak_bytes)}; a stack-only model "
        f"would take {_chunk_name(stack_chunk)}: peak {format_size(stack.peak_bytes)}"
    )
    return {
        "head": head,
        "cutoffs": cutoffs,
        "tied": tied,
        "parameters": sum(p.numel() for p in model.parameters()),
        "head_share": head_peak / shapes.step_peak,  # of the shape model's peak per step
        "none": {**vars(none), "shape_peak": shapes.peak(None)},
        "auto": {**vars(measured[plan.chunk]), "chunk": plan.chunk, "plan": plan.as_dict()},
        "stack_only": {"chunk": stack_chunk, "peak_bytes": stack.peak_bytes},
    }


def _chunk_name(chunk: int | None) -> str:
    return "no checkpointing" if chunk is None else f"chunk {chunk}"


def vocab_lines(result: dict, meta: dict) -> list[str]:
    """The markdown section of the large-vocabulary case."""
    V, budget = result["vocab"], result["budget"]
    lines = [
        "",
        f"## Large vocabulary: V = {V:,}",
        "",
        f"`{meta['command']}` ({meta['started']}, {meta['minutes']:.1f} min): an LM over {V:,} "
        f"random tokens, one LSTM layer, E = H = {result['hidden']}, batch {result['batch']}, "
        f"tbptt.window = {result['window']}; `auto` under memory.budget={budget}. shape model = "
        "MemoryModel.from_shapes before any measurement; stack-only = the same model without the "
        "head's terms (the chunk it would fit, measured).",
        "",
        "| head | parameters | head's share of a step (shape model) | none: peak (shape model) "
        "| auto: chunk | auto: saved | auto: peak | stack-only: chunk, peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        none, auto, stack = row["none"], row["auto"], row["stack_only"]
        name = row["head"] + (f" {row['cutoffs']}" if row["cutoffs"] else "")
        name += ", tied" if row.get("tied") else ""
        fits = "within" if auto["peak_bytes"] <= result["budget_bytes"] else "OVER"
        over = "over" if stack["peak_bytes"] > result["budget_bytes"] else "within"
        lines.append(
            f"| {name} | {row['parameters']:,} | {row['head_share']:.0%} | "
            f"{format_size(none['peak_bytes'])} ({format_size(none['shape_peak'])}) | "
            f"{auto['chunk'] or '—'} | {format_size(auto['saved_bytes'])} | "
            f"{format_size(auto['peak_bytes'])} ({fits} {budget}; predicted "
            f"{format_size(auto['plan']['predicted_peak_bytes'])}) | "
            f"{_chunk_name(stack['chunk'])}, {format_size(stack['peak_bytes'])} ({over}) |"
        )
    return lines


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares exponent k of y ~ T^k."""
    xs = [math.log(t) for t, _ in points]
    ys = [math.log(v) for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum(
        (a - mx) ** 2 for a in xs
    )


def output_stem(args: argparse.Namespace) -> Path:
    return Path(args.out) / ("bench_memory_quick" if args.quick else "bench_memory")


def write_outputs(
    args: argparse.Namespace, results: list[dict], meta: dict, vocab: dict | None
) -> None:
    stem = output_stem(args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    slopes = {p: slope([(r["T"], r["plans"][p]["saved_bytes"]) for r in results]) for p in PLANS}
    meta["saved_bytes_slopes"] = slopes
    saved = {"meta": meta, "results": results, "vocab": vocab}
    stem.with_suffix(".json").write_text(json.dumps(saved, indent=2))

    lines = [
        "# Memory benchmark: full BPTT, one update",
        "",
        f"`{meta['command']}` on {meta['device']} ({meta['machine']}); torch {meta['torch']}; "
        f"hidden {args.hidden}, batch {args.batch}, {args.layers} LSTM layers (cudnn backend: "
        f"{meta['kernel']}), vocabulary {V}, tbptt.window = T. Budget for `auto`: "
        f"{args.budget} at every T. Started {meta['started']}, took {meta['minutes']:.1f} min.",
        "",
        "saved = bytes autograd holds for backward when the forward ends; peak = high-water mark "
        "of one forward + backward above the weights (CPU: profiler memory events); time = median "
        "wall seconds of interleaved updates, ratio = median of per-repetition ratios to `none` "
        "(range in brackets); faults = minor page faults per update (median). `—` = not timed "
        "separately: the time is the single profiled update's.",
        "",
        "| T | plan | chunk | saved | peak | saved / none | peak / none | step s | time / none "
        "| faults |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for p in PLANS:
            row = r["plans"][p]
            extrapolated = row.get("extrapolated", False)
            mark = " (extrapolated)" if extrapolated else ""
            ratio = (
                f"{row['time_ratio']:.3f} ({row['time_ratio_range'][0]:.2f}–"
                f"{row['time_ratio_range'][1]:.2f})"
                if "time_ratio" in row
                else "—"
            )
            seconds = "—" if extrapolated else f"{row['seconds']:.2f}"
            faults = f"{row['faults']:,.0f}" if "faults" in row else "—"
            if not extrapolated and row.get("reps", 0) == 0:
                seconds += " (profiled)"
            lines.append(
                f"| {r['T']} | {p} | {row['chunk'] or '—'} | {format_size(row['saved_bytes'])}"
                f"{mark} | {format_size(row['peak_bytes'])}{mark} | "
                f"{percent(row, 'saved_ratio', r)} | {percent(row, 'peak_ratio', r)} | "
                f"{seconds} | {ratio} | {faults} |"
            )
    lines += [
        "",
        "\\* against `none`'s bytes extrapolated linearly from the largest T where it ran.",
        "",
        "Fitted exponent k of saved bytes ~ T^k over all T: "
        + ", ".join(f"{p} {k:.2f}" for p, k in slopes.items())
        + ".",
    ]
    target = next((r for r in results if r["T"] == TARGET_T), None)
    if target is not None and "time_ratio" in target["plans"]["auto"]:
        auto = target["plans"]["auto"]
        lines += [
            "",
            f"Target at T = {TARGET_T}: auto peak {auto['peak_ratio']:.2%} of none's (goal "
            f"<= 5%) at {auto['time_ratio']:.3f}x its step time (goal <= 1.25x).",
        ]
    if vocab is not None:
        lines += vocab_lines(vocab["result"], vocab["meta"])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, slopes, stem.with_suffix(".png"), args)
    say(f"wrote {stem}.md, .png, .json")


def percent(row: dict, key: str, result: dict) -> str:
    """A ratio to none; marked when none's bytes were extrapolated, not measured."""
    if row.get("extrapolated"):
        return "—"
    star = "*" if result["plans"]["none"].get("extrapolated") else ""
    return f"{row[key]:.2%}{star}"


def plot(results: list[dict], slopes: dict, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    Ts = [r["T"] for r in results]
    colors = {"none": "tab:red", "chunk": "tab:blue", "auto": "tab:green"}
    labels = {"none": "none", "chunk": "chunk ⌈√T⌉", "auto": f"auto ({args.budget})"}
    for p in PLANS:
        for key, style in (("saved_bytes", "-"), ("peak_bytes", "--")):
            ys = [r["plans"][p][key] / 2**20 for r in results]
            what = "saved" if key == "saved_bytes" else "peak"
            label = f"{labels[p]} {what}" + (f" (k={slopes[p]:.2f})" if what == "saved" else "")
            ax_mem.plot(Ts, ys, style, marker="o", color=colors[p], label=label, ms=3)
    ax_mem.axhline(parse_size(args.budget) / 2**20, color="tab:green", lw=0.8, ls=":")
    ax_mem.set(xscale="log", yscale="log", xlabel="T (steps of full BPTT)", ylabel="MiB")
    ax_mem.set_title("memory of one update (dashed: peak)")
    ax_mem.legend(fontsize=7)
    for p in ("chunk", "auto"):
        pts = [
            (r["T"], r["plans"][p]["time_ratio"]) for r in results if "time_ratio" in r["plans"][p]
        ]
        if pts:
            ax_time.plot(*zip(*pts, strict=True), marker="o", color=colors[p], label=labels[p])
    ax_time.axhline(1.25, color="grey", lw=0.8, ls=":")
    ax_time.set(xscale="log", xlabel="T", ylabel="step time / none")
    timed = [r["T"] for r in results if "time_ratio" in r["plans"]["auto"]]
    ax_time.set_xticks(timed, [str(t) for t in timed])
    ax_time.minorticks_off()
    ax_time.set_title("time (median of interleaved ratios)")
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget", default="200MiB", help="memory.budget for auto, every T")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions below --big")
    parser.add_argument("--target-reps", type=int, default=5, help="repetitions at T=2048")
    parser.add_argument("--big", type=int, default=4096, help="from this T: profiled time only")
    parser.add_argument("--none-limit", default="6GiB", help="run `none` only below this peak")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--quick", action="store_true", help="small model, T = 64 ... 512")
    parser.add_argument("--render", metavar="JSON", help="only rewrite md/png from a saved run")
    parser.add_argument("--vocab-budget", default="160MiB", help="memory.budget, V = 32,768 case")
    parser.add_argument(
        "--vocab-only", action="store_true", help="run the large-vocabulary case alone"
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        vars(args).update(saved["meta"]["args"])
        write_outputs(args, saved["results"], saved["meta"], saved.get("vocab"))
        return
    if args.quick:  # a smoke run: its files go to outputs/, not over the committed ones
        if args.out == str(ROOT / "docs"):
            args.out = str(ROOT / "outputs" / "bench_memory")
        args.sizes, args.hidden, args.batch, args.budget = [64, 128, 256, 512], 128, 8, "6MiB"
        args.reps, args.target_reps, args.vocab_budget = 2, 0, "6MiB"
    if args.vocab_only:
        run_vocab_only(args)
        return
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(hidden_size=args.hidden, num_layers=args.layers, backend="cudnn"), TASK
    ).to(args.device)
    from seqtrain.cells import kernel_name

    started = time.strftime("%Y-%m-%d %H:%M")
    start = time.perf_counter()
    say(
        f"bench_memory: T = {args.sizes}, hidden {args.hidden}, batch {args.batch}, "
        f"{args.layers} layers, budget {args.budget}, device {args.device}"
    )
    results, none_fit = [], {}
    for T in sorted(args.sizes):
        results.append(bench_length(args, model, T, none_fit))
    vocab = timed_vocab(args)
    meta = {
        "command": "python scripts/bench_memory.py" + (" --quick" if args.quick else ""),
        "device": args.device,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "kernel": kernel_name(model.rnn, torch.device(args.device)),
        "torch": torch.__version__,
        "started": started,
        "minutes": (time.perf_counter() - start) / 60,
        "argv": sys.argv[1:],
        "args": {k: v for k, v in vars(args).items() if k not in ("render", "out")},
    }
    write_outputs(args, results, meta, vocab)


def timed_vocab(args: argparse.Namespace) -> dict:
    """The large-vocabulary case with its own command line, date and minutes."""
    started, start = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    result = bench_vocab(VOCAB_QUICK if args.quick else VOCAB, args.vocab_budget, args.device)
    command = "python scripts/bench_memory.py" + (" --quick" if args.quick else " --vocab-only")
    minutes = (time.perf_counter() - start) / 60
    return {
        "meta": {"command": command, "started": started, "minutes": minutes},
        "result": result,
    }


def run_vocab_only(args: argparse.Namespace) -> None:
    """The large-vocabulary case, put into the JSON of the last full run and redrawn with it."""
    path = output_stem(args).with_suffix(".json")
    if not path.is_file():
        sys.exit(f"--vocab-only adds to {path}, which does not exist: run the sweep first")
    saved = json.loads(path.read_text())
    vocab = timed_vocab(args)
    vars(args).update(saved["meta"]["args"])
    write_outputs(args, saved["results"], saved["meta"], vocab)


if __name__ == "__main__":
    main()
