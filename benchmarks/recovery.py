"""Benchmark: recovery recipes at the same wall-clock time, judged in and out of domain.

Compresses the built-in default model with `--preset best` or the `--preset` named (exact mode;
calibrated on `wiki`, or with `--calibration wiki+perldoc` on `wiki` and Perl's documentation),
then recovers that one checkpoint with each recipe (RECIPES) for the same number of minutes on what
the recipe trains on, and evaluates every result, and the dense model, by perplexity at 128 and
2048 tokens on each judge (JUDGES): the `wiki` test split, and two corpora no recipe trains or
calibrates on, `pydocs` (the Python documentation) and `fortunes` (quotations, jokes and verse).
Each step runs in its own process, one at a time: the recipes share a time budget, so nothing
else may run beside them.

Each section of docs/records/recovery.md is one run, named in SECTIONS with the options that measured it:
`--section NAME` alone re-measures it (options given beside it override the table's), and
`--page-only` rewrites it from the work folder's record of the last run.

    .venv/bin/python benchmarks/recovery.py --section recovery-best-50-kd
    .venv/bin/python benchmarks/recovery.py --section recovery-best-50-kd --page-only
"""
import argparse
import datetime
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from common import (DOCS, RUNS, Load, debian_text, evaluate, head_commit, lorap, machine_line, stored_or_measured,
                    update_section)

# The sections of docs/records/recovery.md, each with the options of the run that measured it.
SECTIONS = {
    "recovery-best-20": "--ratio 0.2 --minutes 8.0 --recipes lora,lora-kd,full,full-kd,full-kd-mix,dense-control "
                        "--section recovery-best-20",
    "recovery-paper-20": "--preset paper --ratio 0.2 --minutes 8.0 --recipes lora,full,full-kd,lora-kd "
                         "--section recovery-paper-20",
    "recovery-best-20-lora": "--ratio 0.2 --minutes 8.0 --recipes lora,full,full-2e-4 --section recovery-best-20-lora",
    "recovery-best-20-30min": "--ratio 0.2 --minutes 30.0 --recipes full --section recovery-best-20-30min",
    "recovery-wiki-perl": "--ratio 0.2 --minutes 8.0 --recipes full,full-wiki-perl,dense-control-wiki-perl "
                          "--seqlens 128 --section recovery-wiki-perl",
    "recovery-two-domains": "--ratio 0.2 --calibration wiki+perldoc --minutes 30.0 --recipes "
                            "full-wiki-perl,full-wiki-perl-equal,dense-control-wiki-perl-equal "
                            "--section recovery-two-domains",
    "recovery-best-50-two-domains": "--ratio 0.5 --calibration wiki+perldoc --minutes 60.0 --recipes "
                                    "full-wiki-perl-equal --section recovery-best-50-two-domains",
    "recovery-best-50-decayed": "--ratio 0.5 --calibration wiki+perldoc --minutes 60.0 --recipes "
                                "full-wiki-perl-equal,full-wiki-perl-equal-decayed --section recovery-best-50-decayed",
    "recovery-best-50-lora": "--ratio 0.5 --calibration wiki+perldoc --minutes 60.0 --recipes "
                             "full-wiki-perl-equal,full-wiki-perl-equal-decayed,lora-wiki-perl-equal "
                             "--section recovery-best-50-lora",
    "recovery-best-50-kd": "--ratio 0.5 --calibration wiki+perldoc --minutes 60.0 --recipes "
                           "full-wiki-perl-equal-decayed,lora-wiki-perl-equal,full-kd-wiki-perl-equal "
                           "--section recovery-best-50-kd",
    "recovery-best-50-lora-kd": "--ratio 0.5 --calibration wiki+perldoc --minutes 60.0 --recipes "
                                "lora-kd-wiki-perl-equal --section recovery-best-50-lora-kd",
    "recovery-best-50-kd-hidden": "--ratio 0.5 --calibration wiki+perldoc --minutes 60.0 --recipes "
                                  "full-kd-hidden-wiki-perl-equal --section recovery-best-50-kd-hidden",
}


@dataclass(frozen=True)
class Recipe:
    what: str  # the row's words on the page
    options: tuple  # of `lorap recover`, after those every recipe shares (see recover())
    data: str = "wiki"  # what it trains on: `wiki`'s train split, or with Perl's documentation
    control: bool = False  # trains the dense model instead of the checkpoint


WIKI_PERL = "wiki+perldoc"
DECAYED_LR, DECAYED_STEPS = "2e-4", 430
# Learning rates: LoRA at the paper's 1e-4; every weight at 5e-5 (the probes), or at 2e-4
# (lorap's default for --full since the rate sweeps). The `-wiki-perl` recipes train on `wiki` and
# Perl's documentation (benchmarks/get_debian_text.sh), pooled: software documentation like `pydocs`
# but never Python's, so they measure recovery on a neighbouring domain.
RECIPES = {
    "lora": Recipe("LoRA r 8, next-token loss (the paper's recovery)", ("--lr", "1e-4")),
    "lora-kd": Recipe("LoRA r 8, distillation from the dense model", ("--lr", "1e-4", "--teacher", "base")),
    "full": Recipe("every weight, next-token loss", ("--full", "--lr", "5e-5")),
    "full-2e-4": Recipe("every weight, next-token loss, at the default rate of `--full` (2e-4)",
                        ("--full", "--lr", "2e-4")),
    "full-kd": Recipe("every weight, distillation from the dense model",
                      ("--full", "--lr", "5e-5", "--teacher", "base")),
    "full-kd-mix": Recipe("every weight, half distillation (T 2), half next-token",
                          ("--full", "--lr", "5e-5", "--teacher", "base", "--kd-weight", "0.5", "--kd-temperature", "2")),
    # The control: the dense model trained like the `full` row on the same tokens. What it gains on the
    # wiki test split is adaptation to the training domain, not recovery of anything removed.
    "dense-control": Recipe("control: the dense model, every weight, next-token loss", ("--full", "--lr", "5e-5"),
                            control=True),
    "full-wiki-perl": Recipe("every weight, next-token loss, on `wiki` and Perl's documentation",
                             ("--full", "--lr", "5e-5", "--data-mix", "size"), WIKI_PERL),
    "dense-control-wiki-perl": Recipe("control: the dense model, every weight, next-token loss, on `wiki` and Perl's "
                                      "documentation", ("--full", "--lr", "5e-5", "--data-mix", "size"), WIKI_PERL,
                                      control=True),
    # Pooled by size (the rows above, measured before equal shares became the default), three
    # quarters of the windows are Perl's; these give each corpus half.
    "full-wiki-perl-equal": Recipe("every weight, next-token loss, on `wiki` and Perl's documentation in equal shares",
                                   ("--full", "--lr", "5e-5", "--data-mix", "equal"), WIKI_PERL),
    "dense-control-wiki-perl-equal": Recipe("control: the dense model, every weight, next-token loss, on `wiki` and "
                                            "Perl's documentation in equal shares",
                                            ("--full", "--lr", "5e-5", "--data-mix", "equal"), WIKI_PERL, control=True),
    # The rate chosen for 50% by benchmarks/archive/recovery_lr.py (held-out training text only), with
    # the decay ending at about the step that 60 minutes reached before (446): a budget in minutes alone
    # leaves the default two-epoch decay near its peak, so the run never anneals.
    "full-wiki-perl-equal-decayed": Recipe(f"every weight, next-token loss, on `wiki` and Perl's documentation in "
                                           f"equal shares, peak rate {DECAYED_LR} decaying to zero at step "
                                           f"{DECAYED_STEPS}", ("--full", "--lr", DECAYED_LR, "--data-mix", "equal",
                                                                "--max-steps", str(DECAYED_STEPS)), WIKI_PERL),
    # Today's recovery on the same text, for the 50% table: LoRA r 8 at its own default rate.
    "lora-wiki-perl-equal": Recipe("LoRA r 8, next-token loss (the paper's recovery), on `wiki` and Perl's "
                                   "documentation in equal shares", ("--lr", "1e-4", "--data-mix", "equal"), WIKI_PERL),
    # Distillation at 50%, with lorap's defaults for `--full --teacher base` (rate 2e-4, weight 1,
    # temperature 1): the row the issue asks for at every setting, measured at 20% on `wiki` alone.
    "full-kd-wiki-perl-equal": Recipe("every weight, distillation from the dense model (rate 2e-4, weight 1, "
                                      "temperature 1), on `wiki` and Perl's documentation in equal shares",
                                      ("--full", "--lr", "2e-4", "--teacher", "base", "--data-mix", "equal"), WIKI_PERL),
    # LoRA with distillation at 50%: the `lora-wiki-perl-equal` row with the dense model as teacher, and
    # nothing else changed, like `lora-kd` beside `lora` at 20%.
    "lora-kd-wiki-perl-equal": Recipe("LoRA r 8, distillation from the dense model (rate 1e-4, weight 1, temperature "
                                      "1), on `wiki` and Perl's documentation in equal shares",
                                      ("--lr", "1e-4", "--teacher", "base", "--data-mix", "equal"), WIKI_PERL),
    # `full-kd-wiki-perl-equal` plus the match of every layer's output to the dense model's. Its weight is
    # not tuned on any judge: before training, a layer's output is off by a mean relative squared error
    # about an eighth of the distillation loss in nats (both per token, on this checkpoint), so weight 8
    # starts the two terms at about the same size.
    "full-kd-hidden-wiki-perl-equal": Recipe("every weight, distillation from the dense model and its layers' outputs "
                                             "(rate 2e-4, weight 1, temperature 1, layer-output weight 8), on `wiki` "
                                             "and Perl's documentation in equal shares",
                                             ("--full", "--lr", "2e-4", "--teacher", "base", "--kd-hidden-weight", "8",
                                              "--data-mix", "equal"), WIKI_PERL),
}
CONTROLS = tuple(name for name, recipe in RECIPES.items() if recipe.control)
# The judges: perplexity on each, by name. `wiki` is the training domain (its test split); the others
# are text that no recipe trains on and no checkpoint calibrates on.
JUDGES = {
    "wiki": "`wiki` (its test split: the training domain)",
    "pydocs": "`pydocs` (Python 3.11 documentation sources: software documentation and code)",
    "fortunes": "`fortunes` (quotations, jokes and verse from Debian's fortune cookies, those on computing left out; "
                "benchmarks/get_fortunes.sh)",
}
EXTRA_CORPORA = ("perldoc", "fortunes")  # files that benchmarks/get_debian_text.sh writes
DEFAULT_JUDGES = ",".join(JUDGES)
SEQLENS = "128,2048"
WARMUP = 10  # steps, in every recipe


def source_of(names: str) -> str:
    """What lorap reads for corpora this benchmark names, pooled with '+' (`wiki+perldoc`): the extra
    corpora are text files in lorap's cache."""
    return "+".join(debian_text(name) if name in EXTRA_CORPORA else name for name in names.split("+"))


def trained_on(rows) -> str:
    """What the rows of a table train on, for its heading (empty when every row trains on `wiki` alone)."""
    with_perl = [RECIPES[name].data != "wiki" for name in rows]
    if not any(with_perl):
        return ""
    return " on `wiki` and Perl's documentation" if all(with_perl) else ", on `wiki` alone and with Perl's documentation"


def schedule(rows: dict) -> str:
    """How the learning rate of the rows moves: the default decay over two epochs, of which a budget in
    minutes covers a small part, or a decay that ends at the step a recipe names (`--max-steps`)."""
    fitted = {name: row["report"]["total_steps"] for name, row in rows.items() if "--max-steps" in RECIPES[name].options}
    default = [row["report"] for name, row in rows.items() if name not in fitted]
    ends = "; ".join(f"`{name}`: linear decay to zero at step {steps}" for name, steps in fitted.items())
    if not default:
        return ends
    return ("the default linear decay over 2 epochs, of which the budget covers at most "
            f"{max(report['steps'] / report['total_steps'] for report in default):.0%} (so the rate stays near its "
            "peak" + (f"; {ends} instead)" if fitted else ")"))


def recover(source: Path, out: Path, data: str, eval_every: int, val_size: int, options: list) -> None:
    """`lorap recover` as every recovery benchmark runs it: 10 warmup steps, the held-out loss every
    `eval_every` steps on `val_size` windows, no periodic checkpoint, no progress bar. `options` come
    last, so a recipe's own --max-steps overrides an earlier one."""
    lorap("recover", source, "--out", out, "--data", data, "--warmup-steps", WARMUP, "--eval-every", eval_every,
          "--val-size", val_size, "--save-every", "100000", "--no-progress", "--overwrite", *options)


def default_model_dir() -> Path:
    from lorap.io.default_model import default_model_dir as folder

    return folder()


def judged(model: list, sources: dict, seqlens: str, max_tokens: int, out: Path, split: str = "test") -> dict:
    """Perplexity by judge name and window length; `sources` maps each judge to what lorap reads (the
    evaluation names a file corpus by its path). Kept in `out`: an existing file is read, not re-measured."""
    by_source = evaluate(model, out, ppl=",".join(sources.values()), seqlens=seqlens, max_tokens=max_tokens,
                         split=split, reuse=True)["perplexity"]
    return {"perplexity": {judge: by_source[source] for judge, source in sources.items()}}


def perplexity(evaluation: dict, corpus: str, seqlen: int) -> float:
    return evaluation["perplexity"][corpus][str(seqlen)]


def measure(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    compressed = args.work / "compressed"
    judges = args.judges.split(",")
    sources = {judge: source_of(judge) for judge in judges}  # looked up once: each extra corpus is a script run
    if not (compressed / "config.json").is_file():
        lorap("compress", "--preset", args.preset, "--mode", "exact", "--ratio", args.ratio, "--calibration",
              source_of(args.calibration), "--out", compressed, "--no-speed", "--overwrite")
    results = {"dense": judged(["--alone"], sources, args.seqlens, args.max_tokens, args.work / "dense-eval.json"),
               "none": judged([compressed, "--alone"], sources, args.seqlens, args.max_tokens,
                                args.work / "none-eval.json")}
    rows = {}
    for name in args.recipes.split(","):
        folder, recipe = args.work / name, RECIPES[name]
        if not (folder / "recovery_report.json").is_file():
            with Load() as load:
                recover(default_model_dir() if recipe.control else compressed, folder, source_of(recipe.data),
                        args.eval_every, args.val_size,
                        ["--max-minutes", str(args.minutes), "--max-steps", "100000", *recipe.options])
            (folder / "load.json").write_text(json.dumps(load.record()))
        results[name] = judged([folder, "--alone"], sources, args.seqlens, args.max_tokens,
                                 args.work / f"{name}-eval.json")
        rows[name] = {"report": json.loads((folder / "recovery_report.json").read_text()),
                      "load": json.loads((folder / "load.json").read_text())}
    return {"results": results, "rows": rows, "commit": head_commit(), "judges": judges}


def command(args) -> str:
    """The command line that measures what `args` ask for, as the section quotes it."""
    calibrated = "" if args.calibration == "wiki" else f" --calibration {args.calibration}"
    preset = "" if args.preset == "best" else f" --preset {args.preset}"
    return (f".venv/bin/python benchmarks/recovery.py{preset} --ratio {args.ratio}{calibrated} --minutes {args.minutes} "
            f"--recipes {args.recipes}" + (f" --seqlens {args.seqlens}" if args.seqlens != SEQLENS else "")
            + (f" --judges {args.judges}" if args.judges != DEFAULT_JUDGES else "") + f" --section {args.section}")


def page(args, measured: dict) -> str:
    results, rows = measured["results"], measured["rows"]
    judges = measured.get("judges", ["wiki", "pydocs"])  # the runs before `fortunes` had these two
    unseen = [judge for judge in judges if judge != "wiki"]
    seqlens = [int(s) for s in args.seqlens.split(",")]
    first = seqlens[0]
    dense = results["dense"]
    header = ["recovery", "minutes", "steps"] + [f"{j} {s}" for j in judges for s in seqlens] + \
             [f"{j} {first} vs dense" for j in judges] + ["load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(name, evaluation, minutes, steps, load):
        values = [f"{perplexity(evaluation, j, s):.2f}" for j in judges for s in seqlens]
        ratios = [f"{perplexity(evaluation, j, first) / perplexity(dense, j, first):.2f}x" for j in judges]
        return "| " + " | ".join([name, minutes, steps, *values, *ratios, load]) + " |"

    lines.append(cells("dense (no compression)", dense, "", "", ""))
    lines.append(cells("none", results["none"], "0", "0", ""))
    for name, row in rows.items():
        report = row["report"]
        lines.append(cells(f"`{name}`: {RECIPES[name].what}", results[name], f"{report['train_seconds'] / 60:.1f}",
                           str(report["steps"]), f"{row['load']['before']:.1f} / {row['load']['after']:.1f}"))
    recovered = [name for name in rows if name not in CONTROLS]
    summary = []
    for judge in unseen:
        ranked = sorted(recovered, key=lambda name: perplexity(results[name], judge, first))
        summary.append(
            f"Ranked on `{judge}` at {first} tokens (never trained or calibrated on): "
            + ", ".join(f"`{n}` {perplexity(results[n], judge, first):.2f}" for n in ranked)
            + f"; no recovery {perplexity(results['none'], judge, first):.2f}, dense {perplexity(dense, judge, first):.2f}.")
    for control in [name for name in CONTROLS if name in rows]:
        moves = " and ".join(f"from {perplexity(dense, j, first):.2f} to {perplexity(results[control], j, first):.2f} "
                             f"on `{j}`" for j in judges)
        summary.append(f"The control `{control}` moved the dense model {moves}: that much of any row's change is what "
                       "the same training gives the uncompressed model (adaptation to the text, or, for this "
                       "instruction-tuned model, to plain text of any kind), not recovery of what compression removed.")
    if any(RECIPES[name].data != "wiki" for name in rows):
        summary.append(
            "The `-wiki-perl` rows train on Perl's documentation as well as `wiki` (pooled by size, or half each in "
            "the `-equal` rows; "
            "benchmarks/get_debian_text.sh): software documentation like `pydocs`, though never Python's, so their "
            "`pydocs` figure is recovery on a neighbouring domain, not an unseen one"
            + ("; `fortunes` shares a domain with neither." if "fortunes" in judges else "."))
    calibration = ("calibrated on `wiki`" if args.calibration == "wiki" else
                   f"calibrated on `{args.calibration}`, an equal share of the windows from each")
    return "\n".join([
        f"### `--preset {args.preset}` at {args.ratio:.0%} of the default model"
        + ("" if args.calibration == "wiki" else f" calibrated on `{args.calibration}`")
        + f", recovered {args.minutes:g} minutes a recipe" + trained_on(rows),
        "",
        f"Measured {datetime.date.today().isoformat()} at commit {measured.get('commit', 'unknown')} by:", "", "```", command(args),
        "```", "", machine_line() + " (the page written at that commit)", "",
        f"One checkpoint (`lorap compress --preset {args.preset} --mode exact --ratio {args.ratio}`, {calibration}) "
        f"recovered by each recipe for {args.minutes:g} minutes of training on `wiki` train windows of 256 tokens (the "
        "`-wiki-perl` rows: `wiki` and Perl's documentation, pooled by size, or half each in the `-equal` rows), 4 a step, "
        f"{WARMUP} warmup steps, then " + schedule(rows) + ", the best state by held-out loss kept "
        f"(held-out loss on {args.val_size} windows of the train split every {args.eval_every} steps and at the end; "
        "its time counts in the minutes). "
        f"Perplexity on the first {args.max_tokens:,} test tokens of each judge: "
        + "; ".join(JUDGES[j] for j in judges) + ". "
        + "No recipe trains on, and no checkpoint calibrates on, " + " or ".join(f"`{j}`" for j in unseen) + ". "
        "Load: 1-minute load average before / after each recovery. The time budget is the recipe's own "
        "training and held-out evaluation; loading the models is not counted.",
        "",
        *lines,
        "",
        *summary,
    ])


def parse(argv=None):
    """The options: a section of SECTIONS takes the table's, and those given beside it win."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--preset", default="best")
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes per recipe")
    parser.add_argument("--recipes", default=",".join(name for name, recipe in RECIPES.items() if recipe.data == "wiki"),
                        help=f"of {', '.join(RECIPES)}")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=32,
                        help="held-out windows (its evaluation counts in the budget: the default 186 took a minute)")
    parser.add_argument("--calibration", default="wiki",
                        help="the checkpoint's calibration: wiki, or wiki+perldoc (Perl's documentation as well)")
    parser.add_argument("--judges", default=DEFAULT_JUDGES, help=f"perplexity corpora, of {', '.join(JUDGES)}")
    parser.add_argument("--seqlens", default=SEQLENS)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--section", default="recovery-best-20",
                        help=f"the section written; one of {', '.join(SECTIONS)} also sets the options it was measured with")
    parser.add_argument("--page", type=Path, default=DOCS / "records/recovery.md")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from the work folder's results")
    argv = sys.argv[1:] if argv is None else argv
    section = parser.parse_args(argv).section
    return parser.parse_args([*shlex.split(SECTIONS.get(section, "")), *argv])


def main() -> None:
    args = parse()
    calibrated = "" if args.calibration == "wiki" else f"-calibrated-{args.calibration}"
    args.work = args.work or RUNS / f"bench-recovery-{args.preset}-{args.ratio}{calibrated}-{args.minutes:g}min"
    # One record per section: sections that share a work folder (and so its recoveries and evaluations)
    # show different rows, and each must stay regenerable with --page-only.
    measured = stored_or_measured(args.work / f"measured-{args.section}.json", args.page_only, lambda: measure(args))
    update_section(args.page, args.section, page(args, measured))
    print(f"wrote {args.page} ({args.section})", file=sys.stderr)


if __name__ == "__main__":
    main()
