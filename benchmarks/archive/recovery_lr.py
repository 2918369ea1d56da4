"""Benchmark: the learning rate and schedule of `lorap recover --full`, chosen on held-out training text only.

Recovers one checkpoint that benchmarks/recovery.py compressed (its work folder's `compressed`) with
`--full` at each learning rate for the same number of optimizer steps, on `wiki` and Perl's
documentation in equal shares (--data: other text), the schedule decaying to zero at the last step
or, with --decay-steps, at each step given (a later end is what a run stopped by its time budget got
before the budget shaped the rate: the rate still near its peak when training stops). The settings
are ranked by the held-out loss `lorap recover` already measures: windows of the training sources'
train splits that no step trains on. No judge of docs/records/recovery.md (the `wiki` test split, `pydocs`,
`fortunes`) is read, so the setting chosen here can be judged on them afterwards without having been
fitted to them. Steps, not minutes, bound each run: the comparison does not depend on machine load.

The sections of docs/records/recovery.md it wrote, and the options of each, are SECTIONS; --page-only
rewrites one from its sweep's record.

--judge pydocs adds, for each run, the perplexity on the validation split of the Python
documentation (its train half): a second domain that recovery never trains on and that the page's
judges never read (they read its test half), so a rate can be chosen by how it generalises out of
domain without fitting the test. Runs already trained are only evaluated.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for common and recovery
from common import DOCS, ROOT, head_commit, machine_line, stored_or_measured, update_section  # noqa: E402
from recovery import WARMUP, judged, perplexity, recover, source_of  # noqa: E402

SECTIONS = {
    "recovery-lr-20": '--work "runs/bench-recovery-best-0.2-8min" --lrs 5e-5,2e-4,8e-4 --data wiki --steps 60 '
                      '--judge pydocs --section recovery-lr-20',
    "recovery-lr-50": '--work "runs/bench-recovery-best-0.5-calibrated-wiki+perldoc-60min" --lrs 5e-5,2e-4,8e-4 '
                      '--steps 60 --judge pydocs --section recovery-lr-50',
    "recovery-schedule-50": '--work "runs/bench-recovery-best-0.5-calibrated-wiki+perldoc-60min" --lrs 2e-4 '
                            '--steps 430 --decay-steps 430,7458 --section recovery-schedule-50',
}

DATA = "wiki+perldoc"  # the default: what the 50% rows of docs/records/recovery.md train on
JUDGE_TOKENS = 16384  # --judge: validation tokens read per run


def sweep_folder(args) -> Path:
    """Where the runs of one sweep live, in the work folder: by step count, and by data when not the default."""
    return args.work / (f"lr-sweep-{args.steps}-steps" + (f"-{args.data}" if args.data != DATA else ""))


def run_folder(args, lr: str, decay: int) -> Path:
    """One run of the sweep: its recovered checkpoint and report."""
    return sweep_folder(args) / (f"lr-{lr}" if decay == args.steps else f"lr-{lr}-decay-{decay}")


def validation_perplexity(folder: Path, corpus: str) -> float:
    """Perplexity at 128 tokens on the first JUDGE_TOKENS of `corpus`'s validation split (kept in the folder)."""
    evaluation = judged([str(folder), "--alone"], {corpus: source_of(corpus)}, "128", JUDGE_TOKENS,
                        folder / f"validation-{corpus}.json", split="validation")
    return perplexity(evaluation, corpus, 128)


def judge(args, measured: dict) -> None:
    """Add each run's (and the unrecovered checkpoint's) perplexity on --judge's validation split."""
    measured["judge"] = {"corpus": args.judge, "tokens": JUDGE_TOKENS,
                         "before": validation_perplexity(args.work / "compressed", args.judge)}
    for row in measured["rows"].values():
        row["judged"] = validation_perplexity(run_folder(args, row["lr"], row["decay"]), args.judge)


def decays(args) -> list:
    """The steps at which each run's rate reaches zero: --decay-steps, or the last step."""
    return [int(step) for step in args.decay_steps.split(",")] if args.decay_steps else [args.steps]


def measure(args) -> dict:
    compressed = args.work / "compressed"
    if not (compressed / "config.json").is_file():
        sys.exit(f"no compressed checkpoint in {args.work}: run benchmarks/recovery.py with that work folder first")
    rows, trained = {}, False
    for lr in args.lrs.split(","):
        for decay in decays(args):
            folder = run_folder(args, lr, decay)
            if not (folder / "recovery_report.json").is_file():
                trained = True
                recover(compressed, folder, source_of(args.data), args.eval_every, args.val_size,
                        ["--data-mix", "equal", "--full", "--lr", lr, "--max-steps", str(args.steps), "--decay-steps",
                         str(decay)])
            report = json.loads((folder / "recovery_report.json").read_text())
            row = {key: report[key] for key in ("steps", "train_seconds", "best_validation_loss", "best_step")}
            row.update(lr=lr, decay=decay, validation=report["history"]["validation"],
                       budget_minutes=report["settings"]["max_minutes"])
            rows[f"{lr}, decay {decay}"] = row
    record = sweep_folder(args) / "measured.json"
    if not trained and record.is_file():  # every run was there: they were measured at the recorded commit
        return {"rows": rows, "commit": json.loads(record.read_text())["commit"]}
    return {"rows": rows, "commit": head_commit()}


MAX_STEP_COLUMNS = 7  # a long run shows evenly spaced validation steps, not every one


def shown_steps(rows: dict) -> list:
    steps = sorted({step for row in rows.values() for step, *_ in row["validation"]})
    if len(steps) <= MAX_STEP_COLUMNS:
        return steps
    stride = -(-(len(steps) - 1) // (MAX_STEP_COLUMNS - 1))
    return sorted(set(steps[::stride]) | {steps[-1]})


def rate_at_end(row: dict, steps: int) -> float:
    """The learning rate of the last step, from lorap's own schedule."""
    from lorap.recover.schedule import Schedule

    schedule = Schedule(train_examples=steps, batch_size=1, grad_accum=1, epochs=1, max_steps=steps, warmup=WARMUP,
                        lr=float(row["lr"]), seed=0, decay_steps=row["decay"])
    return schedule.lr_at(steps - 1)


def page(args, measured: dict) -> str:
    rows = measured["rows"]
    for key, row in rows.items():  # records written before --decay-steps hold one rate per row
        row.setdefault("lr", key)
        row.setdefault("decay", args.steps)
    compression = json.loads((args.work / "compressed" / "config.json").read_text())["lorap"]["compression"]
    schedules = len({row["decay"] for row in rows.values()}) > 1
    checkpoints = shown_steps(rows)
    header = (["peak learning rate"] + (["decays to zero at step", "rate at the last step"] if schedules else [])
              + ["steps", "minutes"] + [f"step {step}" for step in checkpoints] + ["best"]
              + ([f"`{measured['judge']['corpus']}` validation, PPL @ 128"] if "judge" in measured else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    chosen = min(rows, key=lambda key: rows[key]["best_validation_loss"])
    judged = min(rows, key=lambda key: rows[key]["judged"]) if "judge" in measured else None
    for key, row in rows.items():
        by_step = {step: loss for step, loss, *_ in row["validation"]}
        best = f"{row['best_validation_loss']:.3f} (step {row['best_step']})"
        lr = f"**{row['lr']}**" if key == chosen else row["lr"]
        schedule = [str(row["decay"]), f"{rate_at_end(row, args.steps):.2g}"] if schedules else []
        lines.append("| " + " | ".join([lr, *schedule, str(row["steps"]), f"{row['train_seconds'] / 60:.1f}",
                                        *[f"{by_step[s]:.3f}" if s in by_step else "" for s in checkpoints],
                                        f"**{best}**" if key == chosen else best,
                                        *([f"**{row['judged']:.2f}**" if key == judged else f"{row['judged']:.2f}"]
                                          if judged else [])]) + " |")
    work = args.work.relative_to(ROOT) if args.work.is_relative_to(ROOT) else args.work
    command = (f'.venv/bin/python benchmarks/archive/recovery_lr.py --work "{work}" --lrs {args.lrs} '
               + (f"--data {args.data} " if args.data != DATA else "")
               + f"--steps {args.steps}" + (f" --decay-steps {args.decay_steps}" if args.decay_steps else "")
               + (f" --judge {measured['judge']['corpus']}" if "judge" in measured else "")
               + f" --section {args.section}")
    decay = ("linear decay toward zero at the step each row names (the rate of the last step shows how far it got)"
             if schedules else f"linear decay to zero at step {args.steps}")
    borrowed = [f"The row decaying at step {row['decay']} is the run benchmarks/recovery.py made with these settings "
                f"and a {row['budget_minutes']:g}-minute budget (its report copied into this sweep's folder), which the "
                "schedule ended first." for row in rows.values() if row.get("budget_minutes")]
    judge_sentences = []
    if judged:
        corpus = measured["judge"]["corpus"]
        judge_sentences = [
            f" The last column is each recovered checkpoint's perplexity on the first {measured['judge']['tokens']:,} "
            f"tokens of `{corpus}`'s validation split at 128 tokens: text of another domain that recovery never "
            "trains on, and not the test split this page judges on. Before recovery the checkpoint scores "
            f"{measured['judge']['before']:.2f} there."]
    return "\n".join([
        f"### The {'schedule' if schedules else 'learning rate'} of `--full` for `--preset {compression['preset']}` at "
        f"{compression['ratio']:.0%}, chosen on held-out training text",
        "",
        f"Measured {datetime.date.today().isoformat()} at commit {measured['commit']} by:", "", "```", command, "```", "",
        machine_line() + " (the page written at that commit)", "",
        f"The checkpoint in that work folder, recovered with `--full` for {args.steps} optimizer steps at each "
        + ("setting" if schedules else "peak learning rate")
        + f": 4 windows of 256 tokens a step from `{args.data}`{' in equal shares' if '+' in args.data else ''}, "
        f"{WARMUP} warmup steps, then {decay}. "
        f"Each cell is the mean next-token loss on the {args.val_size} held-out windows of the training sources' "
        "train splits (step 0: before training); lower is better. No test split this page judges on is read here."
        + "".join(" " + sentence for sentence in borrowed) + "".join(judge_sentences),
        "",
        *lines,
        "",
        f"Lowest held-out loss: peak learning rate {rows[chosen]['lr']}"
        + (f", decaying to zero at step {rows[chosen]['decay']}." if schedules else ".")
        + (f" Lowest `{measured['judge']['corpus']}` validation perplexity: peak learning rate {rows[judged]['lr']}"
           + (f", decaying to zero at step {rows[judged]['decay']}." if schedules else ".") if judged else ""),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a benchmarks/recovery.py work folder")
    parser.add_argument("--lrs", default="5e-5,2e-4,8e-4", help="peak learning rates, comma-separated")
    parser.add_argument("--data", default=DATA, help=f"what the runs train on (default {DATA}, in equal shares)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every run")
    parser.add_argument("--decay-steps", help="where the rate reaches zero, comma-separated (default: --steps); a "
                        "later step is the schedule of a run that the time budget stops first")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--section", default="recovery-lr-50")
    parser.add_argument("--page", type=Path, default=DOCS / "records/recovery.md")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from the work folder's results")
    parser.add_argument("--judge", help="also score every run on this corpus's validation split (pydocs: a second "
                        "domain, never trained on), to choose by text of another domain")
    args = parser.parse_args()
    args.work = args.work.resolve()

    def measured_and_judged() -> dict:
        measured = measure(args)
        if args.judge:
            judge(args, measured)
        return measured

    measured = stored_or_measured(sweep_folder(args) / "measured.json", args.page_only, measured_and_judged)
    update_section(args.page, args.section, page(args, measured))
    print(f"wrote {args.page} ({args.section})", file=sys.stderr)


if __name__ == "__main__":
    main()
