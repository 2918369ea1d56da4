"""Benchmark: would a per-layer choice between factor pairs and narrowed heads help? (docs/records/
benchmarks.md, section "attention-per-layer").

The setting of attention_methods.py (attention alone, every layer's attention losing the same share):
the model with best's factor pairs, and the one with heads narrowed and o_proj refitted (the closest
narrowed heads there). Each layer's attention in turn is taken from the narrowed model into the pairs
model, and kept there where that lowers perplexity on other windows of the calibration corpus (`wiki`
train, a different seed from the calibration's): the choice a per-layer rule could make from the
calibration domain, with the whole model's loss as its judge. The model with every layer so chosen is
then scored on the validation split of `wiki` and `pydocs`, which the choice never read.

    .venv/bin/python benchmarks/attention_per_layer.py [--ratio 0.25] [--samples 32] [--max-tokens 4096]
"""
import copy
import datetime
import json
import math

from attention_methods import CORPORA, ROWS, SEQLEN, parse_setting
from common import RUNS, machine_line, update_section, validation_perplexity

SECTIONS = {"attention-per-layer": "--ratio 0.25 --samples 32 --max-tokens 4096"}
PAIRS, NARROWED = "factor pairs", "headdim, a = 1, o_proj refitted"  # rows of attention_methods.py
CHOICE_SEED = 1  # the calibration sample is seed 0: the choice is judged on other windows of the same corpus


def measure(ratio: float, samples: int, max_tokens: int) -> dict:
    from lorap.evaluate.perplexity import window_nll
    from lorap.io.data import calibration_samples
    from lorap.io.models import load_model
    from lorap.methods.presets import config_for
    from lorap.pipeline.run import compress_model

    dense, tokenizer, _ = load_model(None)
    choice_windows = calibration_samples(tokenizer, "wiki", samples, SEQLEN, seed=CHOICE_SEED)

    def compressed(settings):
        model = copy.deepcopy(dense)
        config = config_for("best", ratio=ratio, mode="reference", sublayers=("attention",), align=1,
                            calibration_samples=samples, **settings)
        result = compress_model(model, tokenizer, config, progress=False)
        return model, result.plan.to_dict()["totals"]["kv_cache_values_per_token"]

    def choice_perplexity(model):
        nll, count = window_nll(model, choice_windows, desc="choice windows")
        return math.exp(nll / count)

    def validation(model):
        return validation_perplexity(model, tokenizer, max_tokens, CORPORA, SEQLEN)

    (pairs, pairs_cache), (narrowed, narrowed_cache) = compressed(ROWS[PAIRS][1]), compressed(ROWS[NARROWED][1])
    rows = {name: {"choice": choice_perplexity(model), "validation": validation(model), "kv_cache": cache}
            for name, model, cache in ((PAIRS, pairs, pairs_cache), (NARROWED, narrowed, narrowed_cache))}
    layers, swapped = pairs.model.layers, narrowed.model.layers
    by_layer = []
    for index, layer in enumerate(layers):
        kept = layer.self_attn
        layer.self_attn = swapped[index].self_attn
        by_layer.append(choice_perplexity(pairs))
        layer.self_attn = kept
    chosen = [index for index, value in enumerate(by_layer) if value < rows[PAIRS]["choice"]]
    for index in chosen:
        layers[index].self_attn = swapped[index].self_attn
    saved_per_layer = (pairs_cache["dense"] - narrowed_cache["compressed"]) / len(layers)  # every layer narrows alike
    rows["per-layer choice"] = {"choice": choice_perplexity(pairs), "validation": validation(pairs), "chosen": chosen,
                                "kv_cache": {"dense": pairs_cache["dense"],
                                             "compressed": round(pairs_cache["dense"] - saved_per_layer * len(chosen))}}
    return {"rows": rows, "by_layer": by_layer}


def section(measured: dict, args) -> str:
    rows = measured["rows"]
    chosen = rows["per-layer choice"]["chosen"]
    lines = [
        "## A per-layer choice of attention", "",
        f"Written by `.venv/bin/python benchmarks/attention_per_layer.py --ratio {args.ratio} --samples {args.samples} "
        f"--max-tokens {args.max_tokens}` on {datetime.date.today().isoformat()}. The setting of the section above "
        f"(attention alone, every layer's attention losing {args.ratio:.0%} of its parameters, calibrated on "
        f"{args.samples} x {SEQLEN} tokens of `wiki` train). Each layer's attention in turn is taken from the "
        "narrowed model into the factor-pairs model and kept there where that lowers the whole model's perplexity "
        f"on {args.samples} other windows of `wiki` train (the choice windows); the model so chosen is scored on the "
        f"first {args.max_tokens:,} validation tokens of each corpus, which the choice never read. " + machine_line(), "",
        "| attention | layers narrowed | KV cache per token | choice windows (`wiki` train) | wiki (validation) "
        "| pydocs (validation) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    count = len(measured["by_layer"])
    for name, row in rows.items():
        narrowed = {PAIRS: 0, NARROWED: count}.get(name, len(row.get("chosen", ())))
        cache = row["kv_cache"]
        lines.append(f"| {name} | {narrowed} of {count} | {cache['compressed']:,} of {cache['dense']:,} | "
                     f"{row['choice']:.2f} | {row['validation']['wiki']:.2f} | {row['validation']['pydocs']:.2f} |")
    lines += ["", f"Layers the choice narrowed: {', '.join(map(str, chosen)) or 'none'}."]
    return "\n".join(lines)


def main() -> None:
    args = parse_setting(__doc__)  # --samples also counts the choice windows
    measured = measure(args.ratio, args.samples, args.max_tokens)
    RUNS.mkdir(exist_ok=True)
    (RUNS / "attention_per_layer.json").write_text(json.dumps(measured, indent=1))
    update_section(args.page, "attention-per-layer", section(measured, args))


if __name__ == "__main__":
    main()
