"""Benchmark: which multiple ranks and FFN widths should be on this device (the default of --align).

A rank or width the GEMM kernels handle badly wastes the saving (issue: rank 1228 prefilled 1.04x
faster than dense where 1216 gave 1.25x). This sweeps consecutive ranks / widths of real shapes,
times the matrices exactly as a compressed model runs them, and asks, for each candidate multiple
N: how much faster are the multiples of N than the widths around them?

    speed gain of N = mean over multiples m of N of  (m / time(m)) / (mean of w / time(w) over w within N/2 of m)

Times are medians of `--repeats` sweeps, each sweep visiting every width in turn (so a slow spell
of the shared machine falls on all widths alike). The rule picks the smallest candidate whose gain,
averaged over the rows (over the N every row measured), is within TOLERANCE of the best candidate's:
larger multiples cost quality (a coarser grid of ranks), so they must buy speed to be chosen. lorap's
default per device (plan/alignment.py) follows the rule, or says why not.

    .venv/bin/python benchmarks/align_choice.py            # section align-choice-cpu of docs/records/speed.md
    python benchmarks/align_choice.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/align_choice.py --device cuda --page-only   # from the stored record

Every run stores the medians of every width (runs/bench-align/align-choice-DEVICE.json, with the
machine it ran on), so the section can be rewritten without measuring again.

On CUDA every sweep also runs at 4096 tokens (eight 512-token sequences): shorter GEMMs of these
shapes are too small to keep a GPU busy, so the tile sizes the multiple is about show there.
"""
import argparse
import statistics
import sys
import time

import torch

from lorap.bench.timing import sync

from common import device_sweep, update_section

SECTIONS = {
    "align-choice-cpu": "--repeats 6",
    "align-choice-cuda": ("--device cuda --dtype bfloat16", "on a machine with a CUDA GPU, as `bash benchmarks/gpu.sh` runs it"),
}

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
    sync(device)
    begin = time.perf_counter()
    for _ in range(calls):
        _run(x, weights, kind)
    sync(device)
    return time.perf_counter() - begin


def gains(times: dict) -> dict:
    """{N: how much more width per second the multiples of N run than the widths around them}.

    For each multiple m of N: its width per second (m / time) over the mean width per second of
    the widths within N/2 of m (a window symmetric about m, narrowed at the row's ends); then the
    mean of that over the multiples. Comparing each multiple with its neighbours, not with the
    row's average, leaves a row whose time does not depend on the width at 1 for every N (a GPU
    launching kernels too small to fill it), and a row whose time grows evenly with the width too:
    a large N has few multiples, and against the average they would win or lose by where they lie.
    """
    widths = sorted(times)
    first, last = widths[0], widths[-1]
    result = {}
    for n in CANDIDATES:
        ratios = []
        for m in widths:
            reach = min(n // 2, m - first, last - m)
            if m % n or (n > 1 and reach == 0):  # a multiple at the row's very end has no neighbours
                continue
            around = [w / times[w] for w in range(m - reach, m + reach + 1) if w in times]
            ratios.append((m / times[m]) / statistics.mean(around))
        if ratios:
            result[n] = statistics.mean(ratios)
    return result


def mean_gains(rows: list) -> dict:
    """{N: mean gain over the rows} for the N every row measured (a row too narrow to hold a
    multiple of N with neighbours on both sides says nothing of N, and a mean over the other rows
    would not be comparable)."""
    return {n: statistics.mean(row[n] for row in rows) for n in CANDIDATES if all(n in row for row in rows)}


def choose(rows: list) -> int:
    mean_gain = mean_gains(rows)
    best = max(mean_gain.values())
    return min(n for n, gain in mean_gain.items() if gain >= best * (1 - TOLERANCE))


def measure(device, dtype, repeats: int) -> list:
    """Every sweep's row of the record: what was timed and every width's median."""
    rows = []
    for label, hidden, first, count, kind, token_counts in SWEEPS:
        for tokens in token_counts + ((GPU_TOKENS,) if device.type == "cuda" else ()):
            print(f"{label}, {tokens} tokens", file=sys.stderr, flush=True)
            seconds = _sweep(hidden, first, count, kind, tokens, repeats, dtype, device)
            rows.append({"label": f"{label}, widths {first}-{first + count - 1}", "tokens": tokens,
                         "seconds": {str(w): t for w, t in seconds.items()}})
    return rows


def section(record: dict) -> tuple[str, int]:
    """(the markdown section, the chosen N) of a measured record."""
    device, dtype = record["device"], record["dtype"]
    lines = [
        f"## Which multiple to align to ({device}, {dtype})",
        "",
        "Written by `benchmarks/align_choice.py" + (f" --device {device} --dtype {dtype}" if device != "cpu" else "")
        + "`: consecutive ranks or FFN widths of real shapes timed as a compressed model runs them (medians of "
        f"{record['repeats']} sweeps, every width visited in each). A cell is how much more width per second the multiples of N "
        "run than the widths around them (within N/2): 1.10 means the multiples of N are 10% faster per unit of "
        "width than their neighbours; `-` where no multiple of N lies inside the row with a neighbour on each "
        f"side. The default is the smallest N within {TOLERANCE:.0%} of the best mean gain, over the N every row "
        "measured.",
        "",
        record["machine"],
        "",
        "| shapes | tokens | " + " | ".join(f"N = {n}" for n in CANDIDATES) + " |",
        "|---|---:|" + "---:|" * len(CANDIDATES),
    ]
    rows = []
    for measured in record["rows"]:
        row = gains({int(w): t for w, t in measured["seconds"].items()})
        rows.append(row)
        lines.append(f"| {measured['label']} | {measured['tokens']} | "
                     + " | ".join(f"{row[n]:.3f}" if n in row else "-" for n in CANDIDATES) + " |")
    chosen = choose(rows)
    mean_gain = mean_gains(rows)
    lines.append("| **mean** | | " + " | ".join(f"**{mean_gain[n]:.3f}**" if n in mean_gain else "-" for n in CANDIDATES)
                 + " |")
    before, after = record["load_average"]
    from lorap.plan.alignment import DEFAULT_ALIGN

    default = DEFAULT_ALIGN.get(device)
    verdict = (f"lorap's default on {device}" if default == chosen else
               f"lorap's default on {device} is {default}, for the reasons plan/alignment.py gives")
    lines += ["", f"The rule picks **N = {chosen}**: {verdict}. Load average (1 minute): {before:.1f} before, "
              f"{after:.1f} after."]
    return "\n".join(lines), chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    record, record_file, args = device_sweep(parser, "align-choice", 3, measure)
    text, chosen = section(record)
    update_section(args.page, f"align-choice-{record['device']}", text)
    print(f"chosen N = {chosen}; wrote {args.page} (record: {record_file})", file=sys.stderr)


if __name__ == "__main__":
    main()
