"""Benchmark: which multiple ranks and FFN widths should be on this device (the default of --align).

A rank or width the GEMM kernels handle badly wastes the saving (issue: rank 1228 prefilled 1.04x
faster than dense where 1216 gave 1.25x). This sweeps consecutive ranks / widths of real shapes,
times the matrices exactly as a compressed model runs them, and asks, for each candidate multiple
N: how much faster per unit of width are the multiples of N than the average width?

    speed gain of N = mean over all widths w of (time(w) / w)  /  mean over multiples of N of (time(w) / w)

Times are medians of `--repeats` sweeps, each sweep visiting every width in turn (so a slow spell
of the shared machine falls on all widths alike). The default N is the smallest candidate whose gain,
averaged over the rows, is within TOLERANCE of the best candidate's: larger multiples cost quality
(a coarser grid of ranks), so they must buy speed to be chosen.

    .venv/bin/python benchmarks/align_choice.py            # section align-choice of docs/speed.md
    python benchmarks/align_choice.py --device cuda --dtype bfloat16

On CUDA every sweep also runs at 4096 tokens (eight 512-token sequences): shorter GEMMs of these
shapes are too small to keep a GPU busy, so the tile sizes the multiple is about show there.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from docsection import machine_line, update_section

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = (1, 8, 16, 32, 64, 128)
GPU_TOKENS = 4096  # the token count every sweep adds on CUDA
TOLERANCE = 0.01
# (label, hidden size, first width, how many consecutive widths, kind, token counts)
SWEEPS = [
    ("SmolLM2-135M attention factor pair (576 -> r -> 576)", 576, 64, 128, "pair", (1, 512)),
    ("LLaMA-7B attention factor pair (4096 -> r -> 4096)", 4096, 1152, 128, "pair", (1, 512)),
    ("LLaMA-7B FFN (gate, up 4096 -> w; down w -> 4096)", 4096, 8704, 128, "ffn", (1, 128)),
]


def _matrices(full: list, width: int, kind: str) -> list:
    """The weights one width runs, cut from the widest ones: a factor pair (right, left) or an FFN's
    gate, up and down. Each is contiguous, as a loaded checkpoint's weights are."""
    if kind == "pair":
        return [full[0][:width], full[1][:, :width].contiguous()]
    return [full[0][:width], full[1][:width], full[2][:, :width].contiguous()]


def _run(x, weights, kind) -> None:
    if kind == "pair":
        torch.nn.functional.linear(torch.nn.functional.linear(x, weights[0]), weights[1])
    else:
        gate, up = torch.nn.functional.linear(x, weights[0]), torch.nn.functional.linear(x, weights[1])
        torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, weights[2])


def _sweep(hidden, first, count, kind, tokens, repeats, dtype, device) -> dict:
    """{width: median seconds} over `repeats` passes through every width."""
    x = torch.randn(1, tokens, hidden, dtype=dtype, device=device)
    widths = list(range(first, first + count))
    widest = widths[-1]
    shapes = [(widest, hidden), (hidden, widest)] if kind == "pair" else [(widest, hidden), (widest, hidden), (hidden, widest)]
    full = [torch.randn(*shape, dtype=dtype, device=device) * 0.02 for shape in shapes]
    seconds = {w: [] for w in widths}
    with torch.no_grad():
        for _ in range(repeats):
            for width in widths:
                weights = _matrices(full, width, kind)
                once = _timed(x, weights, kind, 1, device)  # also the warm-up
                calls = min(64, max(1, round(0.005 / max(once, 1e-6))))  # short calls: several per sample
                seconds[width].append(_timed(x, weights, kind, calls, device) / calls)
    return {width: statistics.median(values) for width, values in seconds.items()}


def _timed(x, weights, kind, calls, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        _run(x, weights, kind)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def gains(times: dict) -> dict:
    per_width = {w: t / w for w, t in times.items()}
    average = statistics.mean(per_width.values())
    return {n: average / statistics.mean(v for w, v in per_width.items() if w % n == 0)
            for n in CANDIDATES if any(w % n == 0 for w in per_width)}


def choose(rows: list) -> int:
    mean_gain = {n: statistics.mean(row[n] for row in rows if n in row) for n in CANDIDATES}
    best = max(mean_gain.values())
    return min(n for n, gain in mean_gain.items() if gain >= best * (1 - TOLERANCE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "speed.md")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    header = "| shapes | tokens | " + " | ".join(f"N = {n}" for n in CANDIDATES) + " |"
    lines = [
        f"## Which multiple to align to ({args.device}, {args.dtype})",
        "",
        "Written by `benchmarks/align_choice.py"
        + (f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else "") + "`: consecutive ranks or FFN widths of real "
        "shapes timed as a compressed model runs them (medians of "
        f"{args.repeats} sweeps, every width visited in each). A cell is how much faster per unit of width the "
        "multiples of N run than the average width: 1.10 means the multiples of N are 10% faster. The default is "
        f"the smallest N within {TOLERANCE:.0%} of the best average gain.",
        "",
        machine_line(),
        "",
        header,
        "|---|---:|" + "---:|" * len(CANDIDATES),
    ]
    rows = []
    load_before = os.getloadavg()[0]
    for label, hidden, first, count, kind, token_counts in SWEEPS:
        for tokens in token_counts + ((GPU_TOKENS,) if device.type == "cuda" else ()):
            print(f"{label}, {tokens} tokens", file=sys.stderr, flush=True)
            row = gains(_sweep(hidden, first, count, kind, tokens, args.repeats, dtype, device))
            rows.append(row)
            lines.append(f"| {label}, widths {first}-{first + count - 1} | {tokens} | "
                         + " | ".join(f"{row[n]:.3f}" if n in row else "-" for n in CANDIDATES) + " |")
    chosen = choose(rows)
    mean_gain = {n: statistics.mean(row[n] for row in rows if n in row) for n in CANDIDATES}
    lines.append("| **mean** | | " + " | ".join(f"**{mean_gain[n]:.3f}**" for n in CANDIDATES) + " |")
    lines += ["", f"Chosen default for {args.device}: **N = {chosen}**. Load average (1 minute): "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after."]
    update_section(args.page, f"align-choice-{args.device}", "\n".join(lines))
    print(f"chosen N = {chosen}; wrote {args.page}", file=sys.stderr)


if __name__ == "__main__":
    main()
