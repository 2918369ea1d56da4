"""Benchmark: recovery recipes at the same wall-clock time, judged in and out of domain.

Compresses the built-in default model with `--preset best` (exact mode), then recovers that one
checkpoint with each recipe for the same number of minutes on the `wiki` train split (the
`-wiki-perl` recipes: `wiki` and Perl's documentation, pooled), and evaluates every result, and
the dense model, by perplexity at 128 and 2048 tokens on the `wiki` test split and on `pydocs`
(the Python documentation: a domain recovery never trained on).
Each step runs in its own process, one at a time: the recipes share a time budget, so nothing
else may run beside them.

    .venv/bin/python benchmarks/recovery.py                       # 20%, 8 min a recipe and the dense control
    .venv/bin/python benchmarks/recovery.py --ratio 0.5 --minutes 60 --section recovery-best-50
    .venv/bin/python benchmarks/recovery.py --recipes full,full-wiki-perl,dense-control-wiki-perl --seqlens 128 --section recovery-wiki-perl
    .venv/bin/python benchmarks/recovery.py --page-only           # rewrite the page from the last run
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from docsection import machine_line, update_section
from perldoc import perldoc_text

ROOT = Path(__file__).resolve().parent.parent
LORAP = [sys.executable, "-m", "lorap.cli"]
# name -> (what the row is, the recover options). Learning rates: LoRA at the paper's 1e-4; every
# weight at 5e-5 (the probes).
RECIPES = {
    "lora": ("LoRA r 8, next-token loss (the paper's recovery)", ["--lr", "1e-4"]),
    "lora-kd": ("LoRA r 8, distillation from the dense model", ["--lr", "1e-4", "--teacher", "base"]),
    "full": ("every weight, next-token loss", ["--full", "--lr", "5e-5"]),
    "full-kd": ("every weight, distillation from the dense model", ["--full", "--lr", "5e-5", "--teacher", "base"]),
    "full-kd-mix": ("every weight, half distillation (T 2), half next-token",
                    ["--full", "--lr", "5e-5", "--teacher", "base", "--kd-weight", "0.5", "--kd-temperature", "2"]),
}
# The control: the dense model trained like the `full` row on the same tokens. What it gains on the
# wiki test split is adaptation to the training domain, not recovery of anything removed.
CONTROL = "dense-control"
CONTROL_RECIPE = ("control: the dense model, every weight, next-token loss", ["--full", "--lr", "5e-5"])
# Mixed data: wiki and Perl's documentation (benchmarks/get_perldoc.sh), pooled. Perl's documentation
# is software documentation like `pydocs` but never Python's, so these rows measure recovery on a
# neighbouring domain, and their control shows how much of it the dense model gains from that text.
WIKI_PERL = {
    "full-wiki-perl": ("every weight, next-token loss, on `wiki` and Perl's documentation", ["--full", "--lr", "5e-5"]),
    "dense-control-wiki-perl": ("control: the dense model, every weight, next-token loss, on `wiki` and Perl's documentation",
                          ["--full", "--lr", "5e-5"]),
}
CONTROLS = (CONTROL, "dense-control-wiki-perl")
CORPORA = ("wiki", "pydocs")
SEQLENS = "128,2048"


def recipe(name: str) -> tuple:
    return CONTROL_RECIPE if name == CONTROL else WIKI_PERL[name] if name in WIKI_PERL else RECIPES[name]


def training_data(name: str) -> str:
    """The --data of a recipe: wiki's train split, or wiki and Perl's documentation pooled."""
    if name not in WIKI_PERL:
        return "wiki"
    return f"wiki+{perldoc_text()}"


def default_model_dir() -> Path:
    from lorap.io.default_model import default_model_dir as folder

    return folder()


def run(command: list) -> float:
    print("$", " ".join(map(str, command)), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def evaluate(model: list, seqlens: str, max_tokens: int, out: Path) -> dict:
    if not out.is_file():
        run([*LORAP, "eval", *model, "--ppl", ",".join(CORPORA), "--seqlen", seqlens, "--max-tokens", str(max_tokens),
             "--tasks", "none", "--json", str(out)])
    return json.loads(out.read_text())


def perplexity(evaluation: dict, corpus: str, seqlen: int) -> float:
    return evaluation["perplexity"][corpus][str(seqlen)]


def measure(args) -> dict:
    args.work.mkdir(parents=True, exist_ok=True)
    compressed = args.work / "compressed"
    if not (compressed / "config.json").is_file():
        run([*LORAP, "compress", "--preset", args.preset, "--mode", "exact", "--ratio", str(args.ratio), "--out",
             str(compressed), "--no-speed", "--overwrite"])
    results = {"dense": evaluate(["--alone"], args.seqlens, args.max_tokens, args.work / "dense-eval.json"),
               "none": evaluate([str(compressed), "--alone"], args.seqlens, args.max_tokens, args.work / "none-eval.json")}
    rows = {}
    for name in args.recipes.split(","):
        folder = args.work / name
        if not (folder / "recovery_report.json").is_file():
            load = os.getloadavg()[0]
            source = default_model_dir() if name in CONTROLS else compressed
            run([*LORAP, "recover", str(source), "--out", str(folder), "--data", training_data(name), "--max-minutes",
                 str(args.minutes), "--max-steps", "100000", "--warmup-steps", "10", "--eval-every", str(args.eval_every),
                 "--val-size", str(args.val_size), "--save-every", "100000", "--no-progress", "--overwrite",
                 *recipe(name)[1]])
            (folder / "load.json").write_text(json.dumps({"before": load, "after": os.getloadavg()[0]}))
        results[name] = evaluate([str(folder), "--alone"], args.seqlens, args.max_tokens, args.work / f"{name}-eval.json")
        rows[name] = {"report": json.loads((folder / "recovery_report.json").read_text()),
                      "load": json.loads((folder / "load.json").read_text())}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"results": results, "rows": rows, "commit": commit}


def page(args, measured: dict) -> str:
    results, rows = measured["results"], measured["rows"]
    seqlens = [int(s) for s in args.seqlens.split(",")]
    dense = results["dense"]
    header = ["recovery", "minutes", "steps"] + [f"{c} {s}" for c in CORPORA for s in seqlens] + \
             [f"{c} {s[0]} vs dense" for c in CORPORA for s in [seqlens]] + ["load"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(name, evaluation, minutes, steps, load):
        values = [f"{perplexity(evaluation, c, s):.2f}" for c in CORPORA for s in seqlens]
        ratios = [f"{perplexity(evaluation, c, seqlens[0]) / perplexity(dense, c, seqlens[0]):.2f}x" for c in CORPORA]
        return "| " + " | ".join([name, minutes, steps, *values, *ratios, load]) + " |"

    lines.append(cells("dense (no compression)", dense, "", "", ""))
    lines.append(cells("none", results["none"], "0", "0", ""))
    for name, row in rows.items():
        report = row["report"]
        lines.append(cells(f"`{name}`: {recipe(name)[0]}", results[name], f"{report['train_seconds'] / 60:.1f}",
                           str(report["steps"]), f"{row['load']['before']:.1f} / {row['load']['after']:.1f}"))
    recovered = [name for name in rows if name not in CONTROLS]
    first = seqlens[0]
    ranked = sorted(recovered, key=lambda name: perplexity(results[name], "pydocs", first))
    summary = [f"Ranked out of domain (`pydocs` at {first} tokens, the figure that cannot be flattered by training "
               "on `wiki`): " + ", ".join(f"`{n}` {perplexity(results[n], 'pydocs', first):.2f}" for n in ranked)
               + f"; no recovery {perplexity(results['none'], 'pydocs', first):.2f}, dense "
               f"{perplexity(dense, 'pydocs', first):.2f}."]
    if CONTROL in rows:
        control = results[CONTROL]
        summary.append(
            f"The control moved the dense model from {perplexity(dense, 'wiki', first):.2f} to "
            f"{perplexity(control, 'wiki', first):.2f} on `wiki` and from {perplexity(dense, 'pydocs', first):.2f} to "
            f"{perplexity(control, 'pydocs', first):.2f} on `pydocs`: that much of any row's `wiki` change is "
            "adaptation to the training text, not recovery.")
    if set(WIKI_PERL) & set(rows):
        summary.append(
            "The `-wiki-perl` rows train on Perl's documentation as well as `wiki` (pooled by size; "
            "benchmarks/get_perldoc.sh): software documentation like `pydocs`, though never Python's, so their "
            "`pydocs` figure is recovery on a neighbouring domain, not an unseen one"
            + (f"; the dense model trained on the same mix moved from {perplexity(dense, 'pydocs', first):.2f} to "
               f"{perplexity(results['dense-control-wiki-perl'], 'pydocs', first):.2f} on `pydocs`."
               if "dense-control-wiki-perl" in rows else "."))
    command = (f".venv/bin/python benchmarks/recovery.py --ratio {args.ratio} --minutes {args.minutes} "
               f"--recipes {args.recipes}" + (f" --seqlens {args.seqlens}" if args.seqlens != SEQLENS else "")
               + f" --section {args.section}")
    return "\n".join([
        f"### `--preset {args.preset}` at {args.ratio:.0%} of the default model, recovered {args.minutes:g} minutes a recipe",
        "",
        f"Measured {datetime.date.today().isoformat()} at commit {measured.get('commit', 'unknown')} by:", "", "```", command,
        "```", "", machine_line() + " (the page written at that commit)", "",
        f"One checkpoint (`lorap compress --preset {args.preset} --mode exact --ratio {args.ratio}`) recovered by each "
        f"recipe for {args.minutes:g} minutes of training on `wiki` train windows of 256 tokens (the `-wiki-perl` rows: "
        "`wiki` and Perl's documentation, pooled), 4 a step, "
        "10 warmup steps, then the default linear decay over 2 epochs, of which the budget covers at most "
        f"{max(r['report']['steps'] / r['report']['total_steps'] for r in rows.values()):.0%} (so the rate stays "
        "near its peak), the best state by held-out loss kept "
        f"(held-out loss on {args.val_size} windows of the train split every {args.eval_every} steps and at the end; "
        "its time counts in the minutes). "
        f"Perplexity on the first {args.max_tokens:,} test tokens of `wiki` and of `pydocs` (Python 3.11 "
        "documentation sources: software documentation and code, a domain the recovery never saw). "
        "Load: 1-minute load average before / after each recovery. The time budget is the recipe's own "
        "training and held-out evaluation; loading the models is not counted.",
        "",
        *lines,
        "",
        *summary,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--preset", default="best")
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes per recipe")
    parser.add_argument("--recipes", default=",".join([*RECIPES, CONTROL]),
                        help=f"of {', '.join([*RECIPES, CONTROL, *WIKI_PERL])}")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-size", type=int, default=32,
                        help="held-out windows (its evaluation counts in the budget: the default 186 took a minute)")
    parser.add_argument("--seqlens", default=SEQLENS)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--section", default="recovery-best-20")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "recovery.md")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from the work folder's results")
    args = parser.parse_args()
    args.work = args.work or ROOT / "runs" / f"bench-recovery-{args.preset}-{args.ratio}-{args.minutes:g}min"
    measured = measure(args) if not args.page_only else json.loads((args.work / "measured.json").read_text())
    (args.work / "measured.json").write_text(json.dumps(measured))
    update_section(args.page, args.section, page(args, measured))
    print(f"wrote {args.page} ({args.section})", file=sys.stderr)


if __name__ == "__main__":
    main()
