"""Benchmark: choosing the parts of `--preset best` on validation text of two domains
(docs/records/benchmarks.md, section "Choosing best on validation data").

Each candidate is a starting point with some settings changed; the candidates fall in groups
(GROUPS), each with its starting point and its section of the page: best's parts (from SVD-LLM
whitening as published and the default refit ridge, which best used before this benchmark chose
their strengths), and best's attention (from `--preset best` as it runs: factor pairs or heads
narrowed). A candidate compresses the
built-in default model (exact mode, calibrated on `wiki` train as every run is) and is scored by
perplexity at 128 tokens on the validation split of `wiki` and of `pydocs` (io/data.py: never the
test tokens), relative to the dense model, geometric mean over the two. The test split is not read
here: the tables that report test perplexity are written by compare_default.py.

Results are kept per candidate in runs/choose-best/results.json, so adding candidates or re-running
after an interruption measures only what is new.

    .venv/bin/python benchmarks/choose_best.py [--group parts|attention] [--ratios 0.2,0.5] [--only NAME,NAME]
"""
import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import DOCS, RUNS, debian_text, machine_line, update_section, validation_perplexity

SECTIONS = {"choose_best": "--ratios 0.2,0.275,0.35,0.5", "choose_best_attention": "--group attention --ratios 0.2,0.5"}
CORPORA = ("wiki", "pydocs")
SEQLEN = 128
# Stands for the path of Perl's documentation as one text file, which benchmarks/get_perldoc.sh
# fetches and prints (resolved only when a candidate that reads it is measured or compared).
PERLDOC = "$(bash benchmarks/get_perldoc.sh)"


@dataclass(frozen=True)
class Group:
    """Candidates measured from one starting point, ranked in one section of the page."""

    section: str
    title: str
    base: dict  # what every candidate starts from: settings over --preset best as it now runs
    base_words: str  # that starting point, in words
    candidates: dict  # name -> (what changes, in words; CompressionConfig settings over `base`)


GROUPS = {
    # The parts: best's parts with SVD-LLM whitening as published and the refit's default ridge (best
    # before these choices). Stated here, not taken from the preset, so that a result stays the
    # measurement of what its row says when the preset changes.
    "parts": Group("choose_best", "Choosing best on validation data", dict(whitening_shrink=0.0, lstsq_ridge=0.01),
                   "best's parts with SVD-LLM whitening as published and the refit's default ridge, 0.01 (what "
                   "`--preset best` was before these choices)", {
        "whitening": ("none (best before these choices)", {}),
        "bias": ("bias compensation in place of the least-squares refit", dict(ffn_update="bias")),
        "awsvd": ("AWSVD in place of whitening", dict(factorization="awsvd")),
        "awsvd+bias": ("both (FLAP's FFN with the paper's attention: `flap-ffn`)", dict(factorization="awsvd", ffn_update="bias")),
        # Between best's parts and flap-ffn's: how far whitening and the refit trust the calibration text.
        "shrink-0.5": ("whitening halfway to AWSVD", dict(whitening_shrink=0.5)),
        "ridge-0.1": ("a 10x stronger refit ridge", dict(lstsq_ridge=0.1)),
        "ridge-1": ("a 100x stronger refit ridge", dict(lstsq_ridge=1.0)),
        "awsvd+ridge-0.1": ("AWSVD, and a 10x stronger refit ridge", dict(factorization="awsvd", lstsq_ridge=0.1)),
        "awsvd+ridge-1": ("AWSVD, and a 100x stronger refit ridge", dict(factorization="awsvd", lstsq_ridge=1.0)),
        # From shrink-0.5: adaptive ranks (best adopts them only if they win at both ratios), and stronger
        # refit ridges, which won pydocs at 20% but lost at 50% with the other attention factors
        # (0.0316228: halfway between 0.1 and 0.01, geometrically).
        "shrink-0.5+adaptive-ranks": ("whitening halfway to AWSVD, ranks allocated across each layer's projections by "
                                      "whitened singular values", dict(whitening_shrink=0.5, rank_allocation="adaptive")),
        "shrink-0.5+ridge-1": ("whitening halfway to AWSVD, and a 100x stronger refit ridge",
                               dict(whitening_shrink=0.5, lstsq_ridge=1.0)),
        "shrink-0.5+ridge-0.1": ("whitening halfway to AWSVD, and a 10x stronger refit ridge",
                                 dict(whitening_shrink=0.5, lstsq_ridge=0.1)),
        "shrink-0.5+ridge-0.03": ("whitening halfway to AWSVD, and a 3.2x stronger refit ridge",
                                  dict(whitening_shrink=0.5, lstsq_ridge=0.0316228)),
        # Mixed-domain calibration (every ranked table calibrates on wiki alone): best at 20% calibrated on
        # wiki and Perl's documentation pooled. Perl's documentation is software documentation like pydocs
        # but never Python's, so this measures a neighbouring domain in the calibration, not the judged one.
        "shrink-0.5+ridge-1+wiki-perl": ("whitening halfway to AWSVD, a 100x stronger refit ridge, and calibration on "
                                         "`wiki` and Perl's documentation pooled (benchmarks/get_perldoc.sh)",
                                         dict(whitening_shrink=0.5, lstsq_ridge=1.0, calibration_source=f"wiki+{PERLDOC}")),
    }),
    # Attention: best's factor pairs against heads narrowed (--attention headdim), each with best's FFN
    # parts, whitening shrink and ridge by the ratio (the ridge the o_proj refit takes too). The narrowed
    # rows state their split and o_proj update, which the preset chooses with --attention headdim (from
    # this group's ranking), so that each row stays the measurement of what it says.
    "attention": Group("choose_best_attention", "Attention in best, on validation data", {},
                       "`--preset best` as it now runs (factor pairs, with the refit ridge it takes at that ratio)", {
        "factor-pairs": ("none", {}),
        "headdim": ("heads narrowed in place of factor pairs, kept value to query/key dimensions 3:1 as the pairs "
                    "share theirs", dict(attention="headdim", allocation_a=3.0, head_dim_update="none")),
        "headdim+a1": ("heads narrowed, as many value as query/key dimensions kept (MoDeGPT's split)",
                       dict(attention="headdim", allocation_a=1.0, head_dim_update="none")),
        "headdim+a1+refit": ("heads narrowed, as many value as query/key dimensions kept, o_proj refitted to the "
                             "dense output over its calibration inputs (what `--preset best --attention headdim` "
                             "runs)", dict(attention="headdim", allocation_a=1.0, head_dim_update="lstsq")),
    }),
}
CANDIDATES = {name: (group, *candidate) for group in GROUPS.values() for name, candidate in group.candidates.items()}


def settings_of(name: str) -> dict:
    group, _, changes = CANDIDATES[name]
    settings = {**group.base, **changes}
    return {key: value.replace(PERLDOC, debian_text("perldoc")) if isinstance(value, str) and PERLDOC in value else value
            for key, value in settings.items()}


def config_of(name: str, ratio: float) -> dict:
    """Everything the candidate's compression computes from: a saved result is reused only while this is equal."""
    from lorap.methods.presets import config_for

    return config_for("best", mode="exact", ratio=ratio, **settings_of(name)).to_dict()


def same_computation(saved: dict, config: dict) -> bool:
    """Whether a saved result's settings are `config`'s. A setting added to lorap since the result was
    saved takes its default there: every new setting's default computes what lorap computed before it
    (the golden outputs hold it to that)."""
    from lorap.pipeline.config import CompressionConfig

    return set(saved) <= set(config) and {**CompressionConfig().to_dict(), **saved} == config


def measure(settings: dict, ratio: float, max_tokens: int) -> dict:
    from lorap import api

    started = time.perf_counter()
    result = api.compress(None, None, preset="best", mode="exact", ratio=ratio, progress=False, stream=False,
                          predict_speed=False, **settings)
    seconds = time.perf_counter() - started
    perplexity = validation_perplexity(result.model, result.tokenizer, max_tokens, CORPORA, SEQLEN)
    totals = result.report["plan"]["totals"]
    return {"perplexity": perplexity, "compress_seconds": seconds, "removed": totals["removed_fraction"],
            "kv_cache_values_per_token": totals["kv_cache_values_per_token"]}


def dense_perplexity(max_tokens: int) -> dict:
    from lorap.io.models import load_model

    model, tokenizer, _ = load_model(None)
    return validation_perplexity(model, tokenizer, max_tokens, CORPORA, SEQLEN)


OPTION_NAMES = {"calibration_source": "calibration"}  # settings whose command-line option is named otherwise


def table(group: Group, results: dict, dense: dict, ratio: float) -> list:
    from lorap.methods.presets import config_for

    today = config_for("best", mode="exact", ratio=ratio).to_dict()
    rows = []
    for name, (words, changes) in group.candidates.items():
        entry = results.get(f"{name}@{ratio}")
        if entry is None or not same_computation(entry["config"], config_of(name, ratio)):
            continue
        if same_computation(entry["config"], today):
            name = f"**{name}** (today's `--preset best`)"
        relative = math.exp(sum(math.log(entry["perplexity"][c] / dense[c]) for c in CORPORA) / len(CORPORA))
        rows.append((relative, name, words, {**group.base, **changes}, entry))
    if not rows:
        return []
    rows.sort(key=lambda row: row[0])
    cache = "kv_cache_values_per_token" in rows[0][-1]
    lines = [f"### {ratio * 100:g}% of the parameters removed", "",
             "| rank | candidate | change from the starting point | wiki (validation) | pydocs (validation) "
             "| two-domain mean vs dense |" + (" KV cache per token |" if cache else ""),
             "|---:|---|---|---:|---:|---:|" + ("---:|" if cache else "")]
    for rank, (relative, name, words, settings, entry) in enumerate(rows, start=1):
        options = " ".join(f"`--{OPTION_NAMES.get(key, key.replace('_', '-'))} {value}`" for key, value in settings.items())
        change = f"{words}: {options}" if options else words
        line = (f"| {rank} | {name} | {change} | {entry['perplexity']['wiki']:.2f} | "
                f"{entry['perplexity']['pydocs']:.2f} | {relative:.3f}x |")
        if cache:
            values = entry["kv_cache_values_per_token"]
            line += f" {values['compressed']:,} of {values['dense']:,} values |"
        lines.append(line)
    return lines + [""]


def section(group: Group, results: dict, dense: dict, max_tokens: int) -> str:
    measured = {key: entry for key, entry in results.items() if key.rpartition("@")[0] in group.candidates}
    body = [
        f"## {group.title}", "",
        f"Written by `.venv/bin/python benchmarks/choose_best.py {SECTIONS[group.section]}`. Each candidate is "
        f"{group.base_words}, with the stated change, `--mode exact`, calibrated on `wiki` train unless the row says "
        "otherwise, and scored on the validation split of both corpora (io/data.py; never their test tokens): "
        f"perplexity at {SEQLEN} tokens on the first {max_tokens:,} validation tokens of each, relative to the dense "
        f"model's ({dense['wiki']:.2f} on `wiki`, {dense['pydocs']:.2f} on `pydocs`), geometric mean over the two.", "",
        f"Measured {', '.join(sorted({entry['measured'] for entry in measured.values()}))}; each result is kept "
        "with the full settings it was compressed with and used only while they are unchanged. " + machine_line(), "",
    ]
    for ratio in sorted({float(key.rpartition("@")[2]) for key in measured}):  # every ratio measured so far
        body += table(group, results, dense, ratio)
    return "\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", choices=GROUPS, default="parts", help="which candidates, and the section they rank in")
    parser.add_argument("--ratios", default="0.2", help="shares of the whole model removed, comma-separated")
    parser.add_argument("--only", help="candidates of the group to measure, comma-separated (default: all)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="validation tokens per corpus")
    parser.add_argument("--work", type=Path, default=RUNS / "choose-best")
    parser.add_argument("--page", type=Path, default=DOCS / "records/benchmarks.md")
    args = parser.parse_args()
    group = GROUPS[args.group]
    ratios = [float(r) for r in args.ratios.split(",")]
    chosen = args.only.split(",") if args.only else list(group.candidates)
    unknown = set(chosen) - set(group.candidates)
    if unknown:
        parser.error(f"unknown candidates {sorted(unknown)}; the {args.group} group's: {', '.join(group.candidates)}")
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    if saved.get("max_tokens") != args.max_tokens:
        saved = {"max_tokens": args.max_tokens, "results": {}}
    results = saved["results"]
    if "dense" not in saved:
        saved["dense"] = dense_perplexity(args.max_tokens)
        store.write_text(json.dumps(saved, indent=1))
    for ratio in ratios:
        for name in chosen:
            key, config = f"{name}@{ratio}", config_of(name, ratio)
            if key in results and same_computation(results[key]["config"], config):
                continue
            print(f"measuring {key}", file=sys.stderr, flush=True)
            results[key] = {"config": config, "measured": datetime.date.today().isoformat(),
                            **measure(settings_of(name), ratio, args.max_tokens)}
            store.write_text(json.dumps(saved, indent=1))  # after each, so an interruption loses one
    update_section(args.page, group.section, section(group, results, saved["dense"], args.max_tokens))
    print(f"wrote {args.page}", file=sys.stderr)


if __name__ == "__main__":
    main()
