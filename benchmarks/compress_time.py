"""Benchmark: how long compression takes against one plain forward pass over the same calibration tokens
(docs/records/results.md, section "compress_time").

On the built-in default model, in one process, repeated and interleaved: the dense model's forward pass
over the calibration windows (128 x 128 tokens of `wiki` train, 8 sequences a batch, as compress
runs them, the LM head included), then each preset compressed in memory at exact 20% with its phases
timed. Each repeat's compress time is divided by that repeat's forward time; the section reports the
median ratio with its range, and the machine's load around each measurement.

    .venv/bin/python benchmarks/compress_time.py [--presets best,paper] [--repeats 3]
"""
import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

from common import DOCS, RUNS, Load, machine_line, update_section

SECTIONS = {"compress_time": "--presets best,paper --repeats 3"}
RATIO = 0.2
SAMPLES, SEQLEN, BATCH = 128, 128, 8


def forward_seconds() -> float:
    import torch

    from lorap.io.data import calibration_samples
    from lorap.io.models import load_model

    model, tokenizer, _ = load_model(None)
    windows = calibration_samples(tokenizer, "wiki", SAMPLES, SEQLEN, 0)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(windows), BATCH):
            model(windows[start : start + BATCH])
    return time.perf_counter() - started


def compress_timings(preset: str) -> dict:
    from lorap import api

    started = time.perf_counter()
    result = api.compress(None, None, preset=preset, mode="exact", ratio=RATIO, progress=False, stream=False,
                          predict_speed=False, calibration_samples=SAMPLES, calibration_seqlen=SEQLEN,
                          batch_size=BATCH)
    return {"seconds": time.perf_counter() - started, "phases": result.report["timings"]}


def measure(presets: list, repeats: int) -> list:
    runs = []
    for repeat in range(repeats):
        with Load() as load:
            run = {"forward": forward_seconds()}
        run["forward_load"] = load.pair()
        for preset in presets:
            with Load() as load:
                run[preset] = compress_timings(preset)
            run[preset]["load"] = load.pair()
            print(f"repeat {repeat + 1}: forward {run['forward']:.1f} s, {preset} {run[preset]['seconds']:.1f} s",
                  flush=True)
        runs.append(run)
    return runs


def section(runs: list, presets: list, command: str) -> str:
    forward = [run["forward"] for run in runs]
    loads = [value for run in runs for value in run["forward_load"]]
    loads += [value for run in runs for preset in presets for value in run[preset]["load"]]
    lines = [
        "## Compression time against one forward pass", "",
        f"Measured {datetime.date.today().isoformat()} by `{command}`. " + machine_line(), "",
        f"The built-in default model in memory, {len(runs)} repeats interleaved in one process: the dense model's "
        f"forward pass over the calibration windows ({SAMPLES} x {SEQLEN} tokens of `wiki` train, {BATCH} a batch, "
        f"LM head included), then each preset compressed at exact {RATIO:.0%} with the same calibration. "
        f"Median, with the range over the repeats in brackets; 'x forward' is each repeat's compress time over "
        f"that repeat's forward pass. Load average around the measurements: {min(loads):.1f} to {max(loads):.1f}.", "",
        f"Forward pass: {statistics.median(forward):.1f} s [{min(forward):.1f}-{max(forward):.1f}].", "",
        "| preset | compress (s) | x forward | phases (s, median) |", "|---|---:|---:|---|",
    ]
    for preset in presets:
        seconds = [run[preset]["seconds"] for run in runs]
        ratios = [run[preset]["seconds"] / run["forward"] for run in runs]
        phase_names = [name for name in runs[0][preset]["phases"] if name != "total"]
        phases = ", ".join(f"{name.replace('_', ' ')} {statistics.median(run[preset]['phases'][name] for run in runs):.1f}"
                           for name in phase_names)
        lines.append(f"| {preset} | {statistics.median(seconds):.1f} [{min(seconds):.1f}-{max(seconds):.1f}] | "
                     f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] | {phases} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="best,paper", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page", type=Path, default=DOCS / "records/results.md")
    args = parser.parse_args()
    presets = args.presets.split(",")
    runs = measure(presets, args.repeats)
    RUNS.mkdir(exist_ok=True)
    (RUNS / "compress_time.json").write_text(json.dumps(runs, indent=1))
    command = f".venv/bin/python benchmarks/compress_time.py --presets {args.presets} --repeats {args.repeats}"
    update_section(args.page, "compress_time", section(runs, presets, command))


if __name__ == "__main__":
    main()
