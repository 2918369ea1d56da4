"""Benchmark: one `lorap eval` of the 20% default-model checkpoint against the dense model.

Perplexity at 128 and 2048, proxy zero-shot acc/acc_norm, parameters, MACs, prefill and decode
speed and peak memory, dense vs compressed; JSON, markdown and PNG charts go to
docs/records/eval-smollm2-20/, and a summary section into docs/records/results.md.

    .venv/bin/python benchmarks/compress_default.py     # makes runs/bench-compress/r0.2 first
    .venv/bin/python benchmarks/eval_default.py         # then this
    .venv/bin/python benchmarks/eval_default.py --reuse # only rewrite docs from an existing run
"""
import argparse
import sys
from pathlib import Path

from common import DOCS, ROOT, lorap, update_section

SECTIONS = {"eval_default": ("", "after compress_default.py, whose 20% checkpoint it evaluates")}
CHECKPOINT = "runs/bench-compress/r0.2"
OUT = "docs/records/eval-smollm2-20"
COMMAND = [
    "lorap", "eval", CHECKPOINT, "--seqlen", "128,2048", "--max-tokens", "8192", "--limit", "100", "--speed",
    "--json", f"{OUT}/report.json", "--markdown", f"{OUT}/report.md",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse", action="store_true", help="do not run the evaluation, only update docs/records/results.md")
    args = parser.parse_args()
    if not args.reuse:
        (ROOT / OUT).mkdir(parents=True, exist_ok=True)
        lorap(*COMMAND[1:])
    report = (ROOT / OUT / "report.md").read_text().splitlines()
    # The report's own tables, with chart links made relative to docs/ instead of the report folder.
    body = [line.replace("](report_charts/", f"]({Path(OUT).name}/report_charts/") for line in report[1:]]
    body = [line.replace("## ", "### ") for line in body]
    section = [
        "## Dense vs 20% compressed, one `lorap eval` (SmolLM2-135M-Instruct)",
        "",
        f"Made by `.venv/bin/python benchmarks/eval_default.py`, which runs `{' '.join(COMMAND)}` "
        f"(full report: [{Path(OUT).name}/report.md]({Path(OUT).name}/report.md)). Perplexity on the first 8,192 `wiki` "
        "test tokens; zero-shot on 100 items of each offline proxy task (not comparable with published tables).",
        *body,
    ]
    update_section(DOCS / "records/results.md", "eval_default", "\n".join(section))
    print("wrote docs/records/results.md", file=sys.stderr)


if __name__ == "__main__":
    main()
