"""Benchmark: how much smaller a factor pair must be than its dense matrix before it runs faster.

A rank-r pair (in -> r -> out) has r * (in + out) weights against the dense in * out; below
r* = in * out / (in + out) it is smaller. But it runs two GEMMs where the dense matrix runs one, and
a thin GEMM uses the hardware less well, so a pair just under r* is smaller and slower. This sweeps
the rank of real attention shapes from 30% to 100% of r* (multiples of 16, --align auto's CPU
multiple), times pair and dense matrix interleaved, and reports each shape's speedup against its
size fraction (pair weights / dense weights = its share of the dense multiply-adds).

The plan keeps a projection dense where its pair's size fraction is above the device's limit
(plan/alignment.py, PAIR_MAX_FRACTION); this table is where that limit comes from.

    .venv/bin/python benchmarks/pair_break_even.py     # section pair-break-even-cpu of docs/speed.md
    python benchmarks/pair_break_even.py --device cuda --dtype bfloat16   # pair-break-even-cuda

On CUDA each sample is synchronised before and after its calls, and a third token count is timed
(4096, eight 512-token sequences): at 512 tokens a 4096-wide GEMM is still too short for a GPU.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from docsection import machine_line, update_section

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # of the parameter break-even rank r*
MULTIPLE = 16
# (label, in_features, out_features)
SHAPES = [
    ("SmolLM2-135M q/o (576 -> 576)", 576, 576),
    ("SmolLM2-135M k/v (576 -> 192)", 576, 192),
    ("LLaMA-7B q/k/v/o (4096 -> 4096)", 4096, 4096),
    ("LLaMA-3-8B k/v (4096 -> 1024)", 4096, 1024),
]
TOKENS = {"cpu": (1, 512), "cuda": (1, 512, 4096)}


def _timed(function, calls: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) / calls


def speedups(in_features, out_features, tokens, repeats, dtype, device) -> dict:
    """{size fraction: median dense time / pair time} over ranks at FRACTIONS of r*."""
    x = torch.randn(1, tokens, in_features, dtype=dtype, device=device)
    dense = torch.randn(out_features, in_features, dtype=dtype, device=device) * 0.02
    break_even = in_features * out_features / (in_features + out_features)
    ranks = sorted({max(MULTIPLE, int(f * break_even) // MULTIPLE * MULTIPLE) for f in FRACTIONS})
    pairs = {r: (torch.randn(r, in_features, dtype=dtype, device=device) * 0.02,
                 torch.randn(out_features, r, dtype=dtype, device=device) * 0.02) for r in ranks}
    times = {r: [] for r in ranks}

    def run_dense():
        F.linear(x, dense)

    with torch.no_grad():
        calls = max(1, min(200, round(0.01 / max(_timed(run_dense, 3, device), 1e-7))))
        for _ in range(repeats):
            for r in ranks:  # dense right before each pair: a slow spell hits both
                right, left = pairs[r]
                dense_time = _timed(run_dense, calls, device)
                pair_time = _timed(lambda: F.linear(F.linear(x, right), left), calls, device)
                times[r].append(dense_time / pair_time)
    return {r * (in_features + out_features) / (in_features * out_features): statistics.median(times[r]) for r in ranks}


def crossover(row: dict) -> float:
    """The largest size fraction at which the pair is still at least as fast as dense, linearly
    interpolated between measured points (0 when it never is)."""
    points = sorted(row.items())
    best = 0.0
    for (f0, s0), (f1, s1) in zip(points, points[1:]):
        if s0 >= 1.0 > s1:
            best = f0 + (s0 - 1.0) * (f1 - f0) / (s0 - s1)
        elif s1 >= 1.0:
            best = f1
    return best if best or not points or points[0][1] < 1.0 else points[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "speed.md")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    command = "benchmarks/pair_break_even.py" + (f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else "")
    lines = [
        f"## When a factor pair is faster than its dense matrix ({args.device}, {args.dtype})",
        "",
        f"Written by `{command}`: a factor pair in -> r -> out against the dense matrix, "
        f"interleaved, medians of {args.repeats}; ranks are multiples of {MULTIPLE} at 30% to 100% of the "
        "parameter break-even rank. A cell is `size fraction: speedup`, where the size fraction is the pair's "
        "weights over the dense matrix's (its share of the multiply-adds) and speedup = dense time / pair time. "
        "`crossover` is the largest size fraction at which the pair is still at least as fast.",
        "",
        machine_line(),
        "",
        "| shape | tokens | speedup at each size fraction | crossover |",
        "|---|---:|---|---:|",
    ]
    crossovers = []
    for label, in_features, out_features in SHAPES:
        for tokens in TOKENS[args.device]:
            print(f"{label}, {tokens} tokens", file=sys.stderr, flush=True)
            row = speedups(in_features, out_features, tokens, args.repeats, dtype, device)
            crossovers.append(crossover(row))
            cells = ", ".join(f"{f:.2f}: {s:.2f}x" for f, s in sorted(row.items()))
            lines.append(f"| {label} | {tokens} | {cells} | {crossovers[-1]:.2f} |")
    lines += ["", f"Smallest crossover: **{min(crossovers):.2f}**, median {statistics.median(crossovers):.2f}. "
              f"Load average (1 minute): {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."]
    update_section(args.page, f"pair-break-even-{args.device}", "\n".join(lines))
    print("\n".join(lines[-1:]), file=sys.stderr)


if __name__ == "__main__":
    main()
