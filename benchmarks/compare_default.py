"""Benchmark: every method side by side on the built-in default model (docs/records/benchmarks.md).

Three `lorap compare` runs on the same calibration samples and evaluation windows:
  main       the paper, the best preset, the baselines as published (heads and channels) and the
             strongest hybrid (flap-ffn), at 20% and 50% of the whole model's parameters:
             perplexity at 128 and 2048 tokens on the test split of both corpora (best's parts were
             chosen on their validation split by benchmarks/choose_best.py). No zero-shot: with 100
             items a task the offline proxies could not tell the leading rows apart (0.51 to 0.57
             at 20%, standard error near 0.035); `lorap eval` reports them for any one model;
  ablations  the paper's parts switched one at a time, and the FFN options alone, at 20% (by
             default; --ablation-ratios): perplexity at 128 tokens;
  rivals     best against the published rivals of other kinds (MoDeGPT, SVD-LLM, ShortGPT,
             SliceGPT; --rival-ratios): perplexity at 128 and 2048 tokens on both corpora and on
             `fortunes` (quotations, jokes and verse: a third domain nothing calibrates on).
Rows are saved as they finish (runs/bench-compare/*/rows), so an interrupted run resumes; a row
another table measured is offered to this one (seed_rows), and `lorap compare` reuses it only where
its key (method, ratio, settings, calibration, evaluation) is this table's, else measures it again.

    .venv/bin/python benchmarks/compare_default.py
"""
import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from common import DOCS, RUNS, debian_text, lorap, machine_line, update_section
from lorap.methods.presets import DEFAULT_COMPARISON

SECTIONS = {"compare_main": "--only main", "compare_ablations": "--only ablations", "compare_rivals": "--only rivals"}
# The comparisons, each one `lorap compare` run and one section (compare_NAME): its title, its rows
# (methods), the option of this script that sets its ratios, the window lengths and corpora it scores. The
# main table is `lorap compare`'s default rows: the paper, best, the baselines as published and the
# strongest hybrid (FLAP's FFN criterion with LoRAP's attention).
TABLES = {
    "main": {"title": "Baselines under one budget", "methods": DEFAULT_COMPARISON, "ratios": "ratios",
             "seqlens": "128,2048", "corpora": ("wiki", "pydocs")},
    "ablations": {"title": "Ablations and options, one at a time",
                  "methods": ("paper", "plain-svd", "asvd", "svd-llm-attention", "uniform-ranks", "no-bottom-keep",
                              "attention-only", "ffn-only", "bias", "lstsq", "adaptive"),
                  "ratios": "ablation_ratios", "seqlens": "128", "corpora": ("wiki", "pydocs")},
    # The rivals of other kinds, as published, against best: the main table's protocol and a third domain.
    "rivals": {"title": "Rivals of other kinds", "methods": ("best", "modegpt", "svd-llm", "shortgpt", "slicegpt"),
               "ratios": "rival_ratios", "seqlens": "128,2048", "corpora": ("wiki", "pydocs", "fortunes")},
}


# The corpora that are text files the benchmarks build (benchmarks/get_debian_text.sh), and what a
# section says of them
EXTRA_CORPORA = {"fortunes": "`fortunes` is quotations, jokes and verse from Debian's fortune cookies (those on "
                             "computing left out; `bash benchmarks/get_fortunes.sh` builds it), a domain nothing here "
                             "calibrates on."}


def run_compare(out: Path, methods: str, ratios: str, seqlens: str, corpora: tuple, max_tokens: int) -> tuple:
    """(the command as the section quotes it, its seconds, how many of its rows an earlier run had measured, how
    many rows it has)"""
    ppl = ",".join(debian_text(name) if name in EXTRA_CORPORA else name for name in corpora)
    command = ["lorap", "compare", "--out", str(out), "--methods", methods, "--ratios", ratios,
               "--max-tokens", str(max_tokens), "--seqlen", seqlens, "--ppl", ppl, "--tasks", "none"]
    seconds = lorap(*command[1:])
    result = json.loads((out / "comparison.json").read_text())
    reused = [path for path in result["reused_rows"] if path != "rows/dense.json"]
    return " ".join(command), seconds, len(reused), len(result["rows"])


def seed_rows(work: Path, table: str, methods: str, ratios: str) -> None:
    """Copy into this table's rows folder the rows of the same methods and ratios that other tables
    measured and this one has not; `lorap compare` checks each one's key before reusing it."""
    wanted = ["dense.json"] + [f"r{float(ratio)}/{name}.json" for ratio in ratios.split(",") for name in methods.split(",")]
    target = work / table / "rows"
    for other in sorted(path for path in work.iterdir() if path.is_dir() and path.name != table):
        for relative in wanted:
            source, copy = other / "rows" / relative, target / relative
            if source.exists() and not copy.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, copy)
                print(f"offering {source} to the {table} table", file=sys.stderr)


def section(title: str, command: str, seconds: float, reused: int, rows: int, table: Path, image_link: str,
            corpora: tuple) -> str:
    body = table.read_text().replace("](comparison.png)", f"]({image_link})")
    extra = [EXTRA_CORPORA[name] for name in corpora if name in EXTRA_CORPORA]
    took = (f"{seconds / 60:.0f} min" + (f", reusing {reused} rows an earlier run of it had measured" if reused else "")
            if reused < rows else "every row as an earlier run of it had measured it")
    return "\n".join([
        f"## {title}", "",
        f"Measured {datetime.date.today().isoformat()} by `.venv/bin/python benchmarks/compare_default.py` "
        f"({took}), which ran:", "", "```", command, "```", "", machine_line(), "",
        *([" ".join(extra), ""] if extra else []), body,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.2,0.5", help="of the main table")
    parser.add_argument("--ablation-ratios", default="0.2", help="of the ablation table")
    parser.add_argument("--rival-ratios", default="0.2,0.5", help="of the rivals table")
    parser.add_argument("--max-tokens", type=int, default=16384, help="test tokens per window length")
    parser.add_argument("--work", type=Path, default=RUNS / "bench-compare")
    parser.add_argument("--page", type=Path, default=DOCS / "records/benchmarks.md")
    parser.add_argument("--only", choices=list(TABLES), help="run one of the tables")
    args = parser.parse_args()
    images = args.page.parent / "img"
    images.mkdir(parents=True, exist_ok=True)
    for name, table in TABLES.items():
        if args.only and name != args.only:
            continue
        out, methods, ratios = args.work / name, ",".join(table["methods"]), getattr(args, table["ratios"])
        if args.work.exists():
            seed_rows(args.work, name, methods, ratios)
        command, seconds, reused, rows = run_compare(out, methods, ratios, table["seqlens"], table["corpora"],
                                                     args.max_tokens)
        image = images / f"compare_{name}.png"
        image.write_bytes((out / "comparison.png").read_bytes())
        update_section(args.page, f"compare_{name}",
                       section(table["title"], command, seconds, reused, rows, out / "comparison.md",
                               f"img/{image.name}", table["corpora"]))
        print(f"wrote {args.page} ({name})", file=sys.stderr)


if __name__ == "__main__":
    main()
