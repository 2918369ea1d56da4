"""Benchmark: LoRAP (reference mode) on the built-in default model at several ratios.

For each ratio: parameters removed, compression wall time, peak memory, and perplexity at
128 and 2048 tokens on the `wiki` test split, dense vs compressed. Each compression and
each evaluation runs in its own process, so peak memory is that run's alone.

    .venv/bin/python benchmarks/compress_default.py              # writes docs/records/results.md
    .venv/bin/python benchmarks/compress_default.py --max-tokens 0   # full test split (slower)
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

from common import DOCS, RUNS, evaluate, load_average, lorap, machine_line, update_section

SECTIONS = {"compress_default": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--seqlens", default="128,2048")
    parser.add_argument("--max-tokens", type=int, default=32768, help="test tokens per window length (0: the whole split)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--work", type=Path, default=RUNS / "bench-compress")
    parser.add_argument("--page", type=Path, default=DOCS / "records/results.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    seqlens = args.seqlens.split(",")

    dense = evaluate([], args.work / "dense-eval.json", seqlens=args.seqlens, max_tokens=args.max_tokens)
    rows = []
    for ratio in args.ratios.split(","):
        folder = args.work / f"r{ratio}"
        load_before = load_average()
        lorap("compress", "--ratio", ratio, "--samples", args.samples, "--out", folder, "--overwrite")
        report = json.loads((folder / "compression_report.json").read_text())
        evaluation = evaluate([folder, "--alone"], args.work / f"r{ratio}-eval.json", seqlens=args.seqlens,
                              max_tokens=args.max_tokens)
        rows.append((ratio, report, evaluation, load_before))

    tokens = f"the first {args.max_tokens:,} tokens of" if args.max_tokens else "all of"
    lines = [
        "## LoRAP on the default model (SmolLM2-135M-Instruct), reference mode",
        "",
        f"Measured {datetime.date.today().isoformat()} by `.venv/bin/python benchmarks/compress_default.py"
        + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 32768 else "")
        + "`. " + machine_line(),
        "",
        f"Calibration: {args.samples} x 128 tokens of the `wiki` train split, seed 0. Perplexity: {tokens} the `wiki` "
        "test split, non-overlapping windows, exp(mean token NLL). Ratio is the per-layer ratio of the paper; "
        "'removed' is the share of the whole model's parameters (embeddings and head are untouched). "
        "Wall time is the whole `lorap compress` run (load, calibration, layer walk, save); peak memory is that "
        "process's maximum RSS. Load is the machine's 1-minute load average when the compression started "
        "(2 cores: above 2, other work was competing and wall times are inflated).",
        "",
        "| ratio | parameters | removed | compress time (s) | layer walk (s) | peak RSS (MB) | load | "
        + " | ".join(f"PPL @ {s}" for s in seqlens)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(seqlens),
        f"| dense | {dense['parameters']:,} | 0 | - | - | - | - | "
        + " | ".join(f"{dense['perplexity']['wiki'][s]:.2f}" for s in seqlens)
        + " |",
    ]
    for ratio, report, evaluation, load in rows:
        totals = report["plan"]["totals"]
        assert totals["compressed_parameters"] == evaluation["parameters"], "report and evaluation disagree"
        lines.append(
            f"| {ratio} | {totals['compressed_parameters']:,} | {totals['removed_fraction']:.2%} | "
            f"{report['timings']['total']:.0f} | {report['timings']['layer_walk']:.0f} | "
            f"{report['peak_memory']['host_rss_mb']:.0f} | {load:.1f} | "
            + " | ".join(f"{evaluation['perplexity']['wiki'][s]:.2f}" for s in seqlens)
            + " |"
        )
    update_section(args.page, "compress_default", "\n".join(lines))
    print(f"wrote {args.page}", file=sys.stderr)


if __name__ == "__main__":
    main()
