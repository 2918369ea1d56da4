"""Benchmark: how much smaller a factor pair must be than its dense matrix before it runs faster.

A rank-r pair (in -> r -> out) has r * (in + out) weights against the dense in * out; below
r* = in * out / (in + out) it is smaller. But it runs two GEMMs where the dense matrix runs one, and
a thin GEMM uses the hardware less well, so a pair just under r* is smaller and slower. This sweeps
the rank of real attention shapes from 30% to 100% of r* (multiples of 16, --align auto's CPU
multiple), times pair and dense matrix interleaved, and reports each shape's speedup against its
size fraction (pair weights / dense weights = its share of the dense multiply-adds).

The plan keeps a projection dense where its pair's size fraction is above the device's limit
(plan/alignment.py, PAIR_MAX_FRACTION); this table is where that limit comes from.

    .venv/bin/python benchmarks/pair_break_even.py     # section pair-break-even-cpu of docs/records/speed.md
    python benchmarks/pair_break_even.py --device cuda --dtype bfloat16   # pair-break-even-cuda
    .venv/bin/python benchmarks/pair_break_even.py --device cuda --page-only   # from the stored record

Every run stores its speedups and machine line (runs/bench-align/pair-break-even-DEVICE.json), so the
section can be rewritten without measuring again.

On CUDA each sample is synchronised before and after its calls; the weights rotate over copies
larger than the L2 cache; 4096 tokens (eight 512-token sequences) are timed too, since at 512 a
4096-wide GEMM is still too short for a GPU; and decode (1 and 16 tokens) is also timed replayed
as a CUDA graph, as serving engines run it, besides eager PyTorch, whose per-kernel launch cost
makes any second kernel as dear as the first at one token.
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lorap.bench.timing import sync

from common import device_sweep, update_section

SECTIONS = {
    "pair-break-even-cpu": "",
    "pair-break-even-cuda": ("--device cuda --dtype bfloat16", "on a machine with a CUDA GPU, as `bash benchmarks/gpu.sh` runs it"),
}

FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # of the parameter break-even rank r*
MULTIPLE = 16
# (label, in_features, out_features)
SHAPES = [
    ("SmolLM2-135M q/o (576 -> 576)", 576, 576),
    ("SmolLM2-135M k/v (576 -> 192)", 576, 192),
    ("LLaMA-7B q/k/v/o (4096 -> 4096)", 4096, 4096),
    ("LLaMA-3-8B k/v (4096 -> 1024)", 4096, 1024),
]
# (tokens, replayed as a CUDA graph) timed on each device
TOKENS = {"cpu": ((1, False), (512, False)),
          "cuda": ((1, False), (1, True), (16, True), (512, False), (4096, False))}
# On CUDA the weights rotate over copies of at least this many bytes in all, more than the GPU's L2
# cache (60 MB on an H200): a decode step reads every layer's weights once, never the same ones twice.
ROTATE_BYTES = 256 * 2**20
MAX_COPIES = 512


def _timed(function, calls: int, device) -> float:
    """Seconds per call of `function(i)` over calls i = 0 .. calls - 1."""
    sync(device)
    begin = time.perf_counter()
    for i in range(calls):
        function(i)
    sync(device)
    return (time.perf_counter() - begin) / calls


def _graphed(function, calls: int, device):
    """`function(i)` for i = 0 .. calls - 1, captured once as a CUDA graph, as a function of the
    same form that replays the graph on i = 0 (and does nothing otherwise). A replay launches
    every kernel at once, as serving engines run decode (vLLM, TensorRT-LLM): the host's cost per
    kernel launch, which dominates eager PyTorch at one token, is gone."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # a warm-up outside the capture: the GEMM library picks its kernels
        for i in range(min(calls, 3)):
            function(i)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            function(i)
    return lambda i: graph.replay() if i == 0 else None


def speedups(in_features, out_features, tokens, repeats, dtype, device, graphed: bool = False) -> dict:
    """{size fraction: median dense time / pair time} over ranks at FRACTIONS of r*."""
    def weights(*shape):
        return torch.randn(*shape, dtype=dtype, device=device) * 0.02

    dense_bytes = out_features * in_features * torch.tensor([], dtype=dtype).element_size()
    copies = 1 if device.type == "cpu" else min(MAX_COPIES, -(-ROTATE_BYTES // dense_bytes))
    x = torch.randn(1, tokens, in_features, dtype=dtype, device=device)
    dense = [weights(out_features, in_features) for _ in range(copies)]
    break_even = in_features * out_features / (in_features + out_features)
    ranks = sorted({max(MULTIPLE, int(f * break_even) // MULTIPLE * MULTIPLE) for f in FRACTIONS})
    pairs = {r: [(weights(r, in_features), weights(out_features, r)) for _ in range(copies)] for r in ranks}
    times = {r: [] for r in ranks}

    def run_dense(i):
        F.linear(x, dense[i % copies])

    def run_pair(rank):
        def run(i):
            right, left = pairs[rank][i % copies]
            F.linear(F.linear(x, right), left)
        return run

    with torch.no_grad():
        calls = max(1, min(200, round(0.01 / max(_timed(run_dense, 3, device), 1e-7))))
        runs = {"dense": run_dense, **{r: run_pair(r) for r in ranks}}
        if graphed:
            runs = {key: _graphed(run, calls, device) for key, run in runs.items()}

        def per_call(run):
            return _timed(run, 1, device) / calls if graphed else _timed(run, calls, device)

        for _ in range(repeats):
            for r in ranks:  # dense right before each pair: a slow spell hits both
                dense_time = per_call(runs["dense"])
                times[r].append(dense_time / per_call(runs[r]))
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


def measure(device, dtype, repeats: int) -> list:
    """Every shape's row of the record: what was timed and every speedup."""
    rows = []
    for label, in_features, out_features in SHAPES:
        for tokens, graphed in TOKENS[device.type]:
            print(f"{label}, {tokens} tokens{', CUDA graph' if graphed else ''}", file=sys.stderr, flush=True)
            row = speedups(in_features, out_features, tokens, repeats, dtype, device, graphed)
            rows.append({"label": label, "tokens": tokens, "graphed": graphed,
                         "speedups": [[fraction, speedup] for fraction, speedup in sorted(row.items())]})
    return rows


def section(record: dict) -> str:
    device, dtype = record["device"], record["dtype"]
    command = "benchmarks/pair_break_even.py" + (f" --device {device} --dtype {dtype}" if device != "cpu" else "")
    lines = [
        f"## When a factor pair is faster than its dense matrix ({device}, {dtype})",
        "",
        f"Written by `{command}`: a factor pair in -> r -> out against the dense matrix, "
        f"interleaved, medians of {record['repeats']}; ranks are multiples of {MULTIPLE} at 30% to 100% of the "
        "parameter break-even rank. A cell is `size fraction: speedup`, where the size fraction is the pair's "
        "weights over the dense matrix's (its share of the multiply-adds) and speedup = dense time / pair time. "
        "`crossover` is the largest size fraction at which the pair is still at least as fast.",
        "",
        record["machine"],
        "",
        "| shape | tokens | speedup at each size fraction | crossover |",
        "|---|---:|---|---:|",
    ]
    crossovers = []
    for row in record["rows"]:
        speedups_by_fraction = dict(row["speedups"])
        crossovers.append(crossover(speedups_by_fraction))
        cells = ", ".join(f"{f:.2f}: {s:.2f}x" for f, s in sorted(speedups_by_fraction.items()))
        lines.append(f"| {row['label']} | {row['tokens']}{' (CUDA graph)' if row['graphed'] else ''} | {cells} | "
                     f"{crossovers[-1]:.2f} |")
    before, after = record["load_average"]
    lines += ["", f"Smallest crossover: **{min(crossovers):.2f}**, median {statistics.median(crossovers):.2f}. "
              f"Load average (1 minute): {before:.1f} before, {after:.1f} after."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    record, record_file, args = device_sweep(parser, "pair-break-even", 7, measure)
    text = section(record)
    update_section(args.page, f"pair-break-even-{record['device']}", text)
    print(text.splitlines()[-1], file=sys.stderr)


if __name__ == "__main__":
    main()
