"""Benchmark: how long the default `lorap eval` of the built-in model takes, proxies scored by lm-eval's
HFLM one request at a time (as before) against lorap's shared-context scorer (now), and whether
every number of the two reports agrees.

Both runs are the real command in a fresh process: `lorap eval --json OUT` with nothing else, so
perplexity on the wiki test split at 128 tokens plus the two offline proxy tasks. The reference run
only swaps the scorer (`evaluate_zeroshot(share_contexts=False)`); everything else is the same code.
Runs alternate (reference first in odd pairs, shared first in even ones) so a slow spell of the
shared machine does not fall on one side only; the 1-minute load average is recorded around each.

    .venv/bin/python benchmarks/archive/eval_speed.py             # one pair (about 30 minutes on 2 cores)
    .venv/bin/python benchmarks/archive/eval_speed.py --pairs 3   # medians and spread of three
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for common
from common import DOCS, LORAP, Load, machine_line, run, update_section  # noqa: E402

SECTIONS = {"eval-speed": ""}
REFERENCE = (
    "import functools, sys; import lorap.evaluate.zeroshot as z; from lorap.cli import main; "
    "z.evaluate_zeroshot = functools.partial(z.evaluate_zeroshot, share_contexts=False); sys.exit(main(sys.argv[1:]))"
)
SCORERS = {
    "lm-eval HFLM, one request at a time (before)": [sys.executable, "-c", REFERENCE],
    "shared contexts (now)": LORAP,
}
# Numbers that must agree exactly. The cloze's secondary `perplexity` metric is left out on purpose:
# HFLM's one-token cache gives one request another's log-probabilities (see shared_context.py).
SAME = ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def timed_eval(command: list[str], out: Path) -> dict:
    with Load() as load:
        seconds = run([*command, "eval", "--json", out])
    return {"seconds": seconds, "load": load.pair(), "report": json.loads(out.read_text())}


def disagreements(first: dict, second: dict) -> list[str]:
    differ = []
    if first["perplexity"] != second["perplexity"]:
        differ.append(f"perplexity {first['perplexity']} vs {second['perplexity']}")
    for task, row in first["zeroshot"].items():
        differ += [f"{task} {key}: {row[key]} vs {second['zeroshot'][task][key]}" for key in SAME
                   if row.get(key) != second["zeroshot"][task].get(key)]
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--page", type=Path, default=DOCS / "records/speed.md")
    args = parser.parse_args()
    runs = {name: [] for name in SCORERS}
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(args.pairs):
            order = list(SCORERS) if pair % 2 == 0 else list(SCORERS)[::-1]
            for name in order:
                print(f"pair {pair + 1}/{args.pairs}: {name}", file=sys.stderr, flush=True)
                runs[name].append(timed_eval(SCORERS[name], Path(scratch) / f"{pair}-{len(runs[name])}.json"))
    before, now = (runs[name] for name in SCORERS)
    differ = [d for old, new in zip(before, now) for d in disagreements(old["report"], new["report"])]
    medians = {name: statistics.median(run["seconds"] for run in runs[name]) for name in SCORERS}
    lines = [
        "## How long the default `lorap eval` takes",
        "",
        "Written by `benchmarks/archive/eval_speed.py"
        + (f" --pairs {args.pairs}" if args.pairs != 1 else "") + "`: `lorap eval` of the built-in model with no "
        "options (perplexity on the whole wiki test split at 128 tokens, and the two offline proxy tasks, 500 "
        "items each), each run a fresh process, wall time from start to exit (loading included). The `before` "
        "run differs only in its scorer: lm-eval's HFLM, one forward pass per request with the vocabulary "
        "projection at every position; `now` runs each context once with its continuations packed behind it "
        "(`lorap.evaluate.shared_context`).",
        "",
        machine_line(),
        "",
        "| proxies scored by | wall time, each run | median | load (1 min) before / after each run |",
        "|---|---|---:|---|",
    ]
    for name in SCORERS:
        lines.append(f"| {name} | " + ", ".join(f"{run['seconds']:.0f} s" for run in runs[name])
                     + f" | {medians[name]:.0f} s | "
                     + ", ".join(f"{run['load'][0]:.1f} / {run['load'][1]:.1f}" for run in runs[name]) + " |")
    ratios = [old["seconds"] / new["seconds"] for old, new in zip(before, now)]
    report = now[0]["report"]
    lines += [
        "",
        f"Speedup of the whole command: **{statistics.median(ratios):.2f}x** (each pair: "
        + ", ".join(f"{r:.2f}x" for r in ratios) + ").",
        "",
        ("Every perplexity and every acc, acc_norm and their standard errors are identical in both reports "
         if not differ else "The reports DISAGREE: " + "; ".join(differ) + ". ")
        + f"(wiki@128 {report['perplexity']['wiki']['128']:.4f}; "
        + "; ".join(f"{task} acc {row['acc']}" + (f", acc_norm {row['acc_norm']}" if row.get("acc_norm") is not None
                                                   else "") for task, row in report["zeroshot"].items()) + ").",
    ]
    update_section(args.page, "eval-speed", "\n".join(lines))
    print("\n".join(lines[-3:]), file=sys.stderr)
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
