"""Benchmark: the learning rate of `lorap recover --full`, chosen on held-out training text only.

Recovers one checkpoint that benchmarks/recovery.py compressed (its work folder's `compressed`) with
`--full` at each learning rate for the same number of optimizer steps, on `wiki` and Perl's
documentation in equal shares, the schedule decaying to zero at the last step, and ranks the rates
by the held-out loss `lorap recover` already measures: windows of the training sources' train
splits that no step trains on. No judge of docs/recovery.md (the `wiki` test split, `pydocs`,
`fortunes`) is read, so the rate chosen here can be judged on them afterwards without having been
fitted to them. Steps, not minutes, bound each run: the comparison does not depend on machine load.

    .venv/bin/python benchmarks/recovery_lr.py --work "runs/bench-recovery-best-0.5-calibrated-wiki+perldoc-60min" \\
        --lrs 5e-5,2e-4,8e-4 --steps 60 --section recovery-lr-50
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

from docsection import head_commit, machine_line, update_section
from recovery import LORAP, ROOT, run, source_of

DATA = "wiki+perldoc"


def measure(args) -> dict:
    compressed = args.work / "compressed"
    if not (compressed / "config.json").is_file():
        sys.exit(f"no compressed checkpoint in {args.work}: run benchmarks/recovery.py with that work folder first")
    rows = {}
    for lr in args.lrs.split(","):
        folder = args.work / f"lr-sweep-{args.steps}-steps" / f"lr-{lr}"
        if not (folder / "recovery_report.json").is_file():
            run([*LORAP, "recover", str(compressed), "--out", str(folder), "--data", source_of(DATA), "--data-mix",
                 "equal", "--full", "--lr", lr, "--max-steps", str(args.steps), "--warmup-steps", "10",
                 "--eval-every", str(args.eval_every), "--val-size", str(args.val_size), "--save-every", "100000",
                 "--no-progress", "--overwrite"])
        report = json.loads((folder / "recovery_report.json").read_text())
        rows[lr] = {key: report[key] for key in ("steps", "train_seconds", "best_validation_loss", "best_step")}
        rows[lr]["validation"] = report["history"]["validation"]
    commit = head_commit(ROOT)
    return {"rows": rows, "commit": commit}


def page(args, measured: dict) -> str:
    rows = measured["rows"]
    compression = json.loads((args.work / "compressed" / "config.json").read_text())["lorap"]["compression"]
    checkpoints = sorted({step for row in rows.values() for step, *_ in row["validation"]})
    header = ["peak learning rate", "steps", "minutes"] + [f"step {step}" for step in checkpoints] + ["best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    chosen = min(rows, key=lambda lr: rows[lr]["best_validation_loss"])
    for lr, row in rows.items():
        by_step = {step: loss for step, loss, *_ in row["validation"]}
        best = f"{row['best_validation_loss']:.3f} (step {row['best_step']})"
        lines.append("| " + " | ".join([f"**{lr}**" if lr == chosen else lr, str(row["steps"]),
                                        f"{row['train_seconds'] / 60:.1f}",
                                        *[f"{by_step[s]:.3f}" if s in by_step else "" for s in checkpoints],
                                        f"**{best}**" if lr == chosen else best]) + " |")
    work = args.work.relative_to(ROOT) if args.work.is_relative_to(ROOT) else args.work
    command = (f'.venv/bin/python benchmarks/recovery_lr.py --work "{work}" --lrs {args.lrs} '
               f"--steps {args.steps} --section {args.section}")
    return "\n".join([
        f"### The learning rate of `--full` for `--preset {compression['preset']}` at {compression['ratio']:.0%}, chosen on "
        "held-out training text",
        "",
        f"Measured {datetime.date.today().isoformat()} at commit {measured['commit']} by:", "", "```", command, "```", "",
        machine_line() + " (the page written at that commit)", "",
        f"The checkpoint in that work folder, recovered with `--full` for {args.steps} optimizer steps at each peak "
        f"learning rate: 4 windows of 256 tokens a step from `{DATA}` in equal shares, 10 warmup steps, then linear "
        f"decay to zero at step {args.steps}. Each cell is the mean next-token loss on the {args.val_size} held-out "
        "windows of the training sources' train splits (step 0: before training); lower is better. "
        "No judge of this page is read here.",
        "",
        *lines,
        "",
        f"Lowest held-out loss: peak learning rate {chosen}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a benchmarks/recovery.py work folder")
    parser.add_argument("--lrs", default="5e-5,2e-4,8e-4", help="peak learning rates, comma-separated")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--section", default="recovery-lr-50")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "recovery.md")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from the work folder's results")
    args = parser.parse_args()
    args.work = args.work.resolve()
    record = args.work / f"lr-sweep-{args.steps}-steps" / "measured.json"
    measured = json.loads(record.read_text()) if args.page_only else measure(args)
    record.write_text(json.dumps(measured))
    update_section(args.page, args.section, page(args, measured))
    print(f"wrote {args.page} ({args.section})", file=sys.stderr)


if __name__ == "__main__":
    main()
