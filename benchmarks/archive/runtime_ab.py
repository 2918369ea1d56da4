"""Benchmark: what lorap's runtime for factor pairs does to one compressed layer, three models in one process.

Section `runtime` of docs/records/speed.md times each configuration in two `lorap bench` runs, one with the
runtime checkpoints load with (`optimize_for_inference`: q/k/v's right factors in one GEMM, left
factors stored column by column) and one with the pairs as saved. Those runs are minutes apart, and
on this shared CPU a 20% row's prefill moved by more than the runtime could. Here the dense layer,
the compressed layer with the runtime and the same compressed layer as saved (the same random
weights: one seed) are timed interleaved in one process, the order reversed every other round, so
`runtime / as saved` is a paired ratio of its own. Decoder layer alone (forward hooks), LLaMA-2-7B
shapes, the paper's plan at `--align auto`, fp32, batch 1: prefill of 512 tokens, and decode (128
tokens after a 128-token prompt, the three models generating in lockstep).

    .venv/bin/python benchmarks/archive/runtime_ab.py                 # section runtime-ab of docs/records/speed.md
    .venv/bin/python benchmarks/archive/runtime_ab.py --page-only     # rewrite it from the stored record
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for common
from common import CONFIGS, DOCS, RUNS, Load, machine_line, stored_or_measured, update_section  # noqa: E402

SECTIONS = {"runtime-ab": ""}
LLAMA2 = CONFIGS / "llama-2-7b.json"
ROWS = [("LLaMA-2-7B, paper 20%, --align auto", 0.2), ("LLaMA-2-7B, paper 50%, --align auto", 0.5)]
PREFILL, PROMPT, NEW_TOKENS = 512, 128, 128
# (numerator, denominator) of each paired ratio: the numerator's time over the denominator's, so the
# denominator's speedup
RATIOS = [("dense", "runtime"), ("dense", "as saved"), ("as saved", "runtime")]
RECORD = RUNS / "bench-speed" / "runtime-ab.json"


def layer_models(ratio: float) -> dict:
    """{label: one-layer model}: dense, and the paper's plan at `ratio` with and without the runtime."""
    from lorap.bench.models import first_layers, random_model
    from lorap.io.models import load_config
    from lorap.methods.presets import config_for
    from lorap.plan.plan import make_plan

    model_config = load_config(str(LLAMA2))
    layout = make_plan(model_config, config_for("paper", ratio=ratio, align="auto").plan_settings()).layout()
    timed = first_layers(model_config, 1)
    cpu = torch.device("cpu")
    return {"dense": random_model(timed, torch.float32, cpu),
            "runtime": random_model(timed, torch.float32, cpu, layout=layout, fuse=True),
            "as saved": random_model(timed, torch.float32, cpu, layout=layout, fuse=False)}


def measure_row(ratio: float, repeats: int, decode_repeats: int) -> dict:
    """Milliseconds inside the decoder layer, each round (prefill) or token (decode), by model."""
    from lorap.bench.run import time_inside_layers

    prefill, (_, decode) = time_inside_layers(layer_models(ratio), torch.device("cpu"), [(1, PREFILL)], PROMPT,
                                              NEW_TOKENS, 1, repeats, decode_repeats)
    return {"prefill_ms": prefill[(1, PREFILL)][1], "decode_ms": decode}


def measure(repeats: int, decode_repeats: int) -> dict:
    with Load() as load:
        rows = {label: measure_row(ratio, repeats, decode_repeats) for label, ratio in ROWS}
    return {"rows": rows, "repeats": repeats, "decode_repeats": decode_repeats, "load": load.pair(),
            "machine": machine_line()}


def _cell(samples: dict, numerator: str, denominator: str) -> str:
    from lorap.bench.timing import paired_ratio

    ratio = paired_ratio(samples[numerator], samples[denominator])
    return f"{ratio['median']:.2f}x [{ratio['low_quartile']:.2f}-{ratio['high_quartile']:.2f}]"


def section(record: dict) -> str:
    header = [f"{a} / {b}" for a, b in RATIOS]
    lines = [
        "## lorap's runtime against the pairs as saved, in one run",
        "",
        "Written by `benchmarks/archive/runtime_ab.py`: one LLaMA-2-7B decoder layer (random weights, the paper's plan at "
        "`--align auto`, fp32, batch 1) timed three ways, interleaved in one process with the order reversed every "
        "other round: dense; compressed with lorap's runtime (`optimize_for_inference`); and the same compressed "
        "weights with their factor pairs as saved. Time inside the decoder layer (forward hooks): prefill of "
        f"{PREFILL} tokens, {record['repeats']} rounds after one warm-up; decode, {NEW_TOKENS} tokens after a "
        f"{PROMPT}-token prompt, {record['decode_repeats']} times. Each cell is a paired ratio, the first model's time "
        "over the second's (a speedup of the second): the median over rounds (decode: tokens) with its quartiles.",
        "",
        record["machine"],
        "",
        "| layer | timed | " + " | ".join(header) + " |",
        "|---|---|" + "---:|" * len(header),
    ]
    for label, row in record["rows"].items():
        for timed, key in ((f"prefill {PREFILL}", "prefill_ms"), ("decode", "decode_ms")):
            lines.append(f"| {label} | {timed} | " + " | ".join(_cell(row[key], a, b) for a, b in RATIOS) + " |")
    lines += ["", f"Load average (1 minute): {record['load'][0]:.1f} before, {record['load'][1]:.1f} after."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="prefill rounds")
    parser.add_argument("--decode-repeats", type=int, default=4, help="decode runs of 128 tokens")
    parser.add_argument("--page", type=Path, default=DOCS / "records/speed.md")
    parser.add_argument("--page-only", action="store_true", help="rewrite the section from the stored record")
    args = parser.parse_args()
    record = stored_or_measured(RECORD, args.page_only, lambda: measure(args.repeats, args.decode_repeats))
    update_section(args.page, "runtime-ab", section(record))
    print(f"wrote {args.page} (runtime-ab)", file=sys.stderr)


if __name__ == "__main__":
    main()
