"""Benchmark: a factor pair's left factor stored row by row (as saved) or column by column.

A pair in -> r -> out ends with its left factor, an out x r matrix. Saved row-major, its rows are
only r long, where the dense matrix's are thousands long; at one token the product is a
matrix-vector product, and a CPU kernel that walks short rows streams the weight more slowly. Stored
column by column (modeling_lorap.column_major_left_factors, part of the runtime checkpoints load
with on the CPU), the same values are read along `out`. This times both layouts, interleaved, on
the left factors of real plans, at one token and at a 512-token prefill: the evidence for applying
that layout, and for applying it on the CPU only.

    .venv/bin/python benchmarks/archive/left_layout.py      # section left-layout of docs/records/speed.md

At one token the weights rotate over copies larger than the last-level cache, as a decode step
reads every layer's weights once.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for common
from common import DOCS, Load, machine_line, update_section  # noqa: E402

SECTIONS = {"left-layout": ""}
# (label, out_features, rank)
SHAPES = [
    ("LLaMA-2-7B q/k at the paper's 50% (rank 512)", 4096, 512),
    ("LLaMA-2-7B q/k at the paper's 20%, aligned (rank 1216)", 4096, 1216),
    ("LLaMA-2-7B v/o at the paper's 50% (rank 1536)", 4096, 1536),
    ("SmolLM2-135M q at best's 20% (rank 96)", 576, 96),
    ("SmolLM2-135M q/o at rank 192", 576, 192),
]
TOKENS = (1, 512)
ROTATE_BYTES = 384 * 2**20  # more than this CPU's 32 MiB L3, many times over
PREFILL_REPEATS = 9  # a 512-token product takes 10-50 ms: fewer rounds suffice


def time_layouts(out_features: int, rank: int, tokens: int, repeats: int) -> dict:
    """{layout: [seconds per product, one sample a round]} for both layouts, interleaved."""
    copies = max(2, ROTATE_BYTES // (out_features * rank * 4)) if tokens == 1 else 2
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(out_features, rank, generator=generator) for _ in range(copies)]
    layouts = {"row-major (as saved)": rows,
               "column-major": [weight.t().contiguous().t() for weight in rows]}  # same values, shape
    x = torch.randn(1, tokens, rank, generator=generator)
    samples = {name: [] for name in layouts}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, weights in layouts.items():
                begin = time.perf_counter()
                for weight in weights:
                    F.linear(x, weight)
                samples[name].append((time.perf_counter() - begin) / copies)
    return samples


def section(rows: list, repeats: int, load: tuple) -> str:
    lines = [
        "## A left factor's layout at one token (cpu, float32)",
        "",
        "Written by `benchmarks/archive/left_layout.py`: the left factor (out x rank) of real plans' factor pairs, "
        "`F.linear` on its weights stored row by row (as saved) and column by column (as lorap's runtime stores "
        f"them on the CPU), interleaved, medians of {repeats} rounds ({PREFILL_REPEATS} at 512 tokens) with quartiles in "
        "brackets; at one token the "
        "weights rotate over copies larger than the L3 cache. `speedup` is row-major time / column-major time.",
        "",
        machine_line(),
        "",
        "| left factor | tokens | row-major (as saved) | column-major | speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, tokens, samples in rows:
        cells = []
        for name in ("row-major (as saved)", "column-major"):
            low, _, high = statistics.quantiles(samples[name], n=4)
            cells.append(f"{statistics.median(samples[name]) * 1e3:.3f} ms [{low * 1e3:.3f}-{high * 1e3:.3f}]")
        ratio = statistics.median(samples["row-major (as saved)"]) / statistics.median(samples["column-major"])
        lines.append(f"| {label} | {tokens} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
    lines += ["", f"Load average (1 minute): {load[0]:.1f} before, {load[1]:.1f} after."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--page", type=Path, default=DOCS / "records/speed.md")
    args = parser.parse_args()
    with Load() as load:
        rows = [(label, tokens, time_layouts(out_features, rank, tokens, args.repeats if tokens == 1 else PREFILL_REPEATS))
                for label, out_features, rank in SHAPES for tokens in TOKENS]
    update_section(args.page, "left-layout", section(rows, args.repeats, load.pair()))
    print(f"wrote {args.page} (left-layout)")


if __name__ == "__main__":
    main()
