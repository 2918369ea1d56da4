"""Benchmark: the three ways lorap compresses attention, alone, at one budget (docs/records/benchmarks.md,
section "attention-methods").

Only attention is compressed (the FFN stays dense), each layer's attention losing the same share of
its parameters, so a row differs from another in how attention is compressed and nothing else:
factor pairs as `best` makes them (SVD-LLM whitening shrunk halfway, the a:1 rule), or heads
narrowed per dimension (`--attention headdim`) with the kept dimensions split between query/key and
value in three ways, whitened (the value basis by the input's second moment shrunk halfway toward
its diagonal, as best's whitening is, or as it is) or plain, with o_proj as the value basis leaves
it or refitted to the dense output (`--head-dim-update lstsq`). Scored on the validation split of
`wiki` (the calibration domain) and `pydocs` (never calibrated on), never on test text.

    .venv/bin/python benchmarks/attention_methods.py [--ratio 0.25] [--samples 32] [--max-tokens 4096]
"""
import argparse
import copy
import datetime
import json
import time
from pathlib import Path

from common import DOCS, RUNS, Load, machine_line, update_section, validation_perplexity

SECTIONS = {"attention-methods": "--ratio 0.25 --samples 32 --max-tokens 4096"}
CORPORA = ("wiki", "pydocs")
SEQLEN = 128
# row -> (what it is, settings over `best` with attention alone compressed)
ROWS = {
    "factor pairs": ("best's factor pairs: whitened SVD, kept {v,o}:{q,k} parameters 3:1", dict(attention="lowrank")),
    "headdim, a = 3": ("heads narrowed, kept value to query/key dimensions 3:1 (value capped at the head)",
                       dict(attention="headdim", allocation_a=3.0)),
    "headdim, a = 1": ("heads narrowed, as many value as query/key dimensions (MoDeGPT's split)",
                       dict(attention="headdim", allocation_a=1.0)),
    "headdim, a = 1, unshrunk": ("as `a = 1`, the value basis chosen by the input's second moment as it is "
                                 "(`--whitening-shrink 0`, MoDeGPT as published) rather than shrunk halfway toward "
                                 "its diagonal as best's is",
                                 dict(attention="headdim", allocation_a=1.0, whitening_shrink=0.0)),
    "headdim, a = 1, o_proj refitted": ("as `a = 1`, o_proj then refitted to the dense output over its calibration "
                                        "inputs (`--head-dim-update lstsq --lstsq-ridge 0.1`)",
                                        dict(attention="headdim", allocation_a=1.0, head_dim_update="lstsq",
                                             lstsq_ridge=0.1)),
    "headdim, a = 0.5": ("heads narrowed, every query/key pair kept, values only",
                         dict(attention="headdim", allocation_a=0.5)),
    "headdim, a = 0.5, o_proj refitted": ("as `a = 0.5`, o_proj refitted as above",
                                          dict(attention="headdim", allocation_a=0.5, head_dim_update="lstsq",
                                               lstsq_ridge=0.1)),
    "headdim, a = 1, plain": ("as `a = 1`, dimensions chosen from the weights alone (no calibration inputs)",
                              dict(attention="headdim", allocation_a=1.0, head_dim_score="plain")),
}


def measure(ratio: float, samples: int, max_tokens: int) -> dict:
    from lorap.io.models import load_model
    from lorap.methods.presets import config_for
    from lorap.pipeline.run import compress_model

    dense, tokenizer, _ = load_model(None)

    def perplexity(model):
        return validation_perplexity(model, tokenizer, max_tokens, CORPORA, SEQLEN)

    rows = {"dense": {"perplexity": perplexity(dense)}}
    for name, (_, settings) in ROWS.items():
        model = copy.deepcopy(dense)
        config = config_for("best", ratio=ratio, mode="reference", sublayers=("attention",), align=1,
                            calibration_samples=samples, **settings)
        with Load() as load:
            started = time.perf_counter()
            result = compress_model(model, tokenizer, config, progress=False)
            seconds = time.perf_counter() - started
        first = result.plan.layers[0]
        totals = result.plan.to_dict()["totals"]
        rows[name] = {"perplexity": perplexity(model), "compress_seconds": seconds, "load": load.pair(),
                      "removed": totals["removed_fraction"], "kv_cache": totals["kv_cache_values_per_token"],
                      "shapes": {"qk_head_dim": first.qk_head_dim, "v_head_dim": first.v_head_dim, "ranks": first.ranks}}
        print(name, rows[name]["perplexity"], flush=True)
    return rows


def section(rows: dict, args) -> str:
    dense = rows["dense"]["perplexity"]
    lines = [
        "## Attention methods alone", "",
        f"Written by `.venv/bin/python benchmarks/attention_methods.py --ratio {args.ratio} --samples {args.samples} "
        f"--max-tokens {args.max_tokens}` on {datetime.date.today().isoformat()}. The built-in model with only its "
        f"attention compressed, every layer's attention losing {args.ratio:.0%} of its parameters (reference mode, "
        f"`--sublayers attention --align 1`), calibrated on {args.samples} x 128 tokens of `wiki` train; perplexity at "
        f"{SEQLEN} tokens on the first {args.max_tokens:,} validation tokens of each corpus (dense: "
        f"{dense['wiki']:.2f} `wiki`, {dense['pydocs']:.2f} `pydocs`). " + machine_line(), "",
        "| attention | what it keeps (layer 0) | model removed | KV cache per token | wiki (validation) | pydocs (validation) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, (words, _) in ROWS.items():
        row = rows[name]
        shapes = row["shapes"]
        kept = (f"q/k {shapes['qk_head_dim']}, v {shapes['v_head_dim']} dims per head" if shapes["qk_head_dim"]
                else ", ".join(f"{p} rank {r}" for p, r in shapes["ranks"].items() if r is not None) or "dense")
        cache = row["kv_cache"]
        lines.append(f"| {name}: {words} | {kept} | {row['removed']:.2%} | {cache['compressed']:,} of {cache['dense']:,} | "
                     f"{row['perplexity']['wiki']:.2f} | {row['perplexity']['pydocs']:.2f} |")
    return "\n".join(lines)


def parse_setting(description: str):
    """The attention-alone setting's options (attention_per_layer.py runs in the same setting)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.25, help="share of each layer's attention removed")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences of 128 tokens")
    parser.add_argument("--max-tokens", type=int, default=4096, help="validation tokens per corpus")
    parser.add_argument("--page", type=Path, default=DOCS / "records/benchmarks.md")
    return parser.parse_args()


def main() -> None:
    args = parse_setting(__doc__)
    rows = measure(args.ratio, args.samples, args.max_tokens)
    RUNS.mkdir(exist_ok=True)
    (RUNS / "attention_methods.json").write_text(json.dumps(rows, indent=1))
    update_section(args.page, "attention-methods", section(rows, args))


if __name__ == "__main__":
    main()
