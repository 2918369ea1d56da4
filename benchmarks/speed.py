"""Benchmark: how much faster compressed models run, and what aligning their shapes costs.

Section `speed`: `lorap bench` (dense and compressed timed interleaved, random weights in the
plan's shapes) on LLaMA-2-7B and LLaMA-3-8B shapes (the first decoder layer plus embeddings and LM
head, as the whole model does not fit in this machine's memory in fp32) and on the built-in
SmolLM2-135M shapes, for the paper's method at 20% and 50% with and without --align, fp32 and bf16.

Section `align-quality`: perplexity of the built-in model at exact 20% of the whole model, with and
without --align, paper and best presets (real compression, wiki calibration, wiki test tokens).

    .venv/bin/python benchmarks/speed.py                      # both sections into docs/speed.md
    .venv/bin/python benchmarks/speed.py --only speed         # one section
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from docsection import machine_line, update_section

ROOT = Path(__file__).resolve().parent.parent
LORAP = [sys.executable, "-m", "lorap.cli"]
CONFIGS = ROOT / "benchmarks" / "configs"

# (label, model argument, extra bench arguments)
SPEED_ROWS = [
    ("LLaMA-2-7B, paper 20%", str(CONFIGS / "llama-2-7b.json"), ["--ratio", "0.2", "--layers", "1"]),
    ("LLaMA-2-7B, paper 20%, --align 32", str(CONFIGS / "llama-2-7b.json"), ["--ratio", "0.2", "--layers", "1", "--align", "32"]),
    ("LLaMA-2-7B, paper 20%, --align 64", str(CONFIGS / "llama-2-7b.json"), ["--ratio", "0.2", "--layers", "1", "--align", "64"]),
    ("LLaMA-2-7B, paper 50%", str(CONFIGS / "llama-2-7b.json"), ["--ratio", "0.5", "--layers", "1"]),
    ("LLaMA-2-7B, paper 50%, --align 64", str(CONFIGS / "llama-2-7b.json"), ["--ratio", "0.5", "--layers", "1", "--align", "64"]),
    ("LLaMA-3-8B (GQA), paper 20%", str(CONFIGS / "llama-3-8b.json"), ["--ratio", "0.2", "--layers", "1"]),
    ("LLaMA-3-8B (GQA), paper 20%, --align 64", str(CONFIGS / "llama-3-8b.json"), ["--ratio", "0.2", "--layers", "1", "--align", "64"]),
    ("SmolLM2-135M, paper exact 20%", None, ["--ratio", "0.2", "--mode", "exact"]),
    ("SmolLM2-135M, paper exact 20%, --align 64", None, ["--ratio", "0.2", "--mode", "exact", "--align", "64"]),
    ("SmolLM2-135M, paper exact 20%, --align 64, bf16", None, ["--ratio", "0.2", "--mode", "exact", "--align", "64", "--dtype", "bfloat16"]),
]
QUALITY_ROWS = [("paper", None), ("paper", 64), ("best", None), ("best", 64)]


def run(command: list) -> None:
    print("$", " ".join(map(str, command)), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def speed_section(work: Path, timing: list) -> str:
    lines = [
        "## Dense vs compressed, timed side by side",
        "",
        "Written by `benchmarks/speed.py --only speed` (`lorap bench`, random weights in the plan's shapes: speed "
        "depends on shapes, not values). Dense and compressed are timed interleaved in one process; medians of "
        f"{timing[timing.index('--repeats') + 1]} repeats after one warm-up, batch 1; speedup = dense time / "
        "compressed time. LLaMA rows time the first decoder layer plus embeddings and LM head (`--layers 1`): "
        "the LM head is untouched by compression and dilutes the layer's gain, so a whole model gains more than "
        "these rows show. Load is the 1-minute load average before and after each row.",
        "",
        machine_line(),
        "",
        "| model and method | dtype | parameters timed, dense -> compressed | prefill 128 | prefill 512 | decode (128 after 128) | load |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for index, (label, model, extra) in enumerate(SPEED_ROWS):
        out = work / f"speed-{index}.json"
        run([*LORAP, "bench", *([model] if model else []), *extra, *timing, "--json", str(out)])
        report = json.loads(out.read_text())
        params = report["parameters"]
        prefill = {row["tokens"]: row for row in report["prefill"].values() if row["batch"] == 1}
        cells = []
        for tokens in (128, 512):
            row = prefill.get(tokens)
            cells.append(f"{row['speedup']:.2f}x ({row['dense']['median_ms']:.0f} -> {row['compressed']['median_ms']:.0f} ms)"
                         if row else "-")
        decode = report["decode"]
        load = report["load_average"]
        lines.append(
            f"| {label} | {report['dtype']} | {params['dense'] / 1e6:.1f}M -> {params['compressed'] / 1e6:.1f}M "
            f"({params['dense'] / params['compressed']:.2f}x fewer) | {cells[0]} | {cells[1]} | {decode['speedup']:.2f}x "
            f"({decode['dense']['median_tokens_per_s']:.1f} -> {decode['compressed']['median_tokens_per_s']:.1f} tok/s) "
            f"| {load['before']:.1f} / {load['after']:.1f} |"
        )
    return "\n".join(lines)


def quality_section(work: Path, max_tokens: int, samples: int) -> str:
    lines = [
        "## What aligning costs in perplexity",
        "",
        f"Written by `benchmarks/speed.py --only align-quality`: the built-in model compressed to exact 20% of its "
        f"parameters ({samples} x 128 calibration tokens from the wiki train split), perplexity at 128 tokens on "
        f"the first {max_tokens:,} wiki test tokens.",
        "",
        machine_line(),
        "",
        "| preset | --align | parameters | removed | ranks (q/k) | FFN widths | PPL @ 128 |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for preset, align in QUALITY_ROWS:
        folder = work / f"quality-{preset}-{align or 1}"
        run([*LORAP, "compress", "--preset", preset, "--ratio", "0.2", "--mode", "exact", "--out", str(folder),
             "--overwrite", "--samples", str(samples), *(["--align", str(align)] if align else [])])
        out = folder.with_suffix(".eval.json")
        run([*LORAP, "eval", str(folder), "--alone", "--ppl", "wiki", "--seqlen", "128", "--max-tokens", str(max_tokens),
             "--tasks", "none", "--json", str(out)])
        evaluation = json.loads(out.read_text())
        config = json.loads((folder / "config.json").read_text())["lorap"]
        totals = json.loads((folder / "compression_report.json").read_text())["plan"]["totals"]
        q_ranks = sorted({layer["q_proj"] for layer in config["layers"]} - {None})
        widths = [layer["intermediate_size"] for layer in config["layers"]]
        lines.append(
            f"| {preset} | {align or 1} | {totals['compressed_parameters']:,} | {totals['removed_fraction']:.2%} | "
            f"{', '.join(map(str, q_ranks)) or 'dense'} | {min(widths)}-{max(widths)} | "
            f"{evaluation['perplexity']['wiki']['128']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["speed", "align-quality"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-speed")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "speed.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.only in (None, "align-quality"):
        update_section(args.page, "align-quality", quality_section(args.work, args.max_tokens, args.samples))
    if args.only in (None, "speed"):
        timing = ["--prefill", "128,512", "--batch", "1", "--repeats", str(args.repeats), "--warmup", "1"]
        update_section(args.page, "speed", speed_section(args.work, timing))
    print(f"wrote {args.page}", file=sys.stderr)


if __name__ == "__main__":
    main()
