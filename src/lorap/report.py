"""Formatting of results for the terminal. Numbers are taken as given, never recomputed here."""


def format_perplexity(result: dict) -> str:
    lines = [f"model: {result['model']}", f"parameters: {result['parameters']:,}"]
    for dataset, by_seqlen in result["perplexity"].items():
        for seqlen, value in by_seqlen.items():
            lines.append(f"perplexity {dataset} @ {seqlen} tokens: {value:.3f}")
    return "\n".join(lines)


def _layout_key(layer_rows: list) -> tuple:
    return tuple((r["module"], r.get("rank"), r.get("width"), r.get("removed", False)) for r in layer_rows)


def _layer_groups(rows: list) -> list:
    """Consecutive layers with identical shapes, as (first, last, rows of the first)."""
    by_layer: dict = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row)
    groups = []
    for index in sorted(by_layer):
        layer_rows = by_layer[index]
        if groups and _layout_key(groups[-1][2]) == _layout_key(layer_rows):
            groups[-1][1] = index
        else:
            groups.append([index, index, layer_rows])
    return groups


def format_plan(plan_dict: dict) -> str:
    """The per-module table and totals, from Plan.to_dict() (the one source of these numbers)."""
    settings, totals = plan_dict["settings"], plan_dict["totals"]
    header = (
        f"LoRAP plan: {settings['mode']} mode, ratio {settings['ratio']:g}"
        + (f" of the whole model (per-layer ratio {plan_dict['layer_ratio']:.4f})" if settings["mode"] == "exact" else " per layer")
        + ("; attention: every head narrowed to fewer query/key and value dimensions" if settings.get("attention") == "headdim"
           else "")
        + (f"; attention: whole KV groups removed with their query heads" if settings.get("attention") == "heads"
           else f"; a = {settings['allocation_a']:g}")
        + f", bottom-keep {settings['bottom_keep']:g}, sublayers {'+'.join(settings['sublayers'])}"
        + ("; FFN: factor pairs" if settings.get("ffn") == "lowrank" else "")
        + ("; every factor pair keeps the same share of its matrix" if settings.get("rank_allocation") == "share" else "")
        + (f"; ranks and widths multiples of {settings['align']}" if settings.get("align", 1) > 1 else "")
        + (f"; factor pairs too large to run faster on {settings['pair_limit']} kept dense"
           if settings.get("pair_limit", "none") != "none" else "")
    )
    removed_layers = totals.get("removed_layers")
    if removed_layers:  # the rest of the header describes parts that do not apply
        header = (f"LoRAP plan: {settings['mode']} mode, ratio {settings['ratio']:g}"
                  + (" of the whole model" if settings["mode"] == "exact" else " of the decoder layers")
                  + f"; {len(removed_layers['layers'])} of {removed_layers['of']} decoder layers removed whole "
                  "(the others unchanged)")
    lines = [header, f"{'module':<12}{'shape':>13}{'rank/width':>14}{'dense':>16}{'kept':>16}{'removed':>9}"]
    for first, last, rows in _layer_groups(plan_dict["modules"]):
        span = f"layer {first}" if first == last else f"layers {first}-{last} (each)"
        lines.append(span)
        for row in rows:
            if row.get("removed"):
                size = "removed"
            elif "width" in row and row.get("rank") is None:
                size = f"width {row['width']}"
            elif "heads" in row:
                size = f"{row['heads']} {'kv heads' if row['module'] in ('k_proj', 'v_proj') else 'heads'}"
            elif "head_dim" in row:
                size = f"head dim {row['head_dim']}"
            else:
                size = "dense" if row["rank"] is None else f"rank {row['rank']}"
            removed = 1 - row["parameters"] / row["dense_parameters"]
            lines.append(
                f"  {row['module']:<10}{'x'.join(map(str, row['shape'])):>13}{size:>14}"
                f"{row['dense_parameters']:>16,}{row['parameters']:>16,}{removed:>9.1%}"
            )
    untouched = totals["untouched_parameters"]
    if removed_layers:  # the removed layers' norms go with them
        dense_other = untouched + removed_layers["norm_parameters"]
        lines.append(f"{'embeddings, norms, LM head':<53}{dense_other:>16,}{untouched:>16,}"
                     f"{1 - untouched / dense_other:>9.1%}")
    else:
        lines.append(f"{'embeddings, norms, LM head (untouched)':<53}{untouched:>16,}{untouched:>16,}{0:>9.1%}")
    for group in ("attention", "ffn"):
        g = totals[group]
        lines.append(f"{'all ' + group:<53}{g['dense_parameters']:>16,}{g['parameters']:>16,}{g['removed_fraction']:>9.1%}")
    lines.append(
        f"{'whole model':<53}{totals['dense_parameters']:>16,}{totals['compressed_parameters']:>16,}"
        f"{totals['removed_fraction']:>9.2%}"
    )
    if "kv_cache_values_per_token" in totals:
        cache = totals["kv_cache_values_per_token"]
        lines.append(f"{'KV cache: keys and values per token':<53}{cache['dense']:>16,}{cache['compressed']:>16,}"
                     f"{1 - cache['compressed'] / cache['dense']:>9.1%}")
    if "predicted_speed" in plan_dict:
        lines.append(format_prediction(plan_dict["predicted_speed"]))
    return "\n".join(lines)


def format_plan_report(report: dict) -> str:
    """`lorap plan`'s text: the plan, the memory to expect and the notes (plan/report.py builds it)."""
    from .plan.memory import format_memory_estimate

    text = format_plan(report) + "\n" + format_memory_estimate(report["memory_estimate"])
    return text + (f"\nnote: {report['note']}" if "note" in report else "")


def format_prediction(prediction: dict) -> str:
    if "skipped" in prediction:
        return f"predicted speed: not measured ({prediction['skipped']})"
    prefill, decode = prediction["prefill"], prediction["decode"]
    return (f"predicted speedup on this machine ({prediction['device']}, {prediction['dtype']}, "
            f"{prediction['threads']} threads; micro-benchmark of {prediction['sampled_layouts']} compressed layer "
            f"layout(s)): prefill {prefill['tokens']} tokens {prefill['speedup']:.2f}x, decode {decode['speedup']:.2f}x "
            f"(measure with `lorap bench`)")


def format_compression(report: dict) -> str:
    if "slicegpt" in report:
        sliced, totals = report["slicegpt"], report["plan"]["totals"]
        return "\n".join([
            f"SliceGPT: residual stream {sliced['kept_dim']} of {sliced['hidden_size']} dims, head {sliced['head']}; "
            f"{totals['compressed_parameters']:,} of {totals['dense_parameters']:,} parameters "
            f"({totals['removed_fraction']:.2%} removed, embeddings and head included)",
            "wall time: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in report["timings"].items())])
    lines = [format_plan(report["plan"])]
    if "predicted_speed" in report:
        lines.append(format_prediction(report["predicted_speed"]))
    lines.append("")
    timings = report["timings"]
    lines.append("wall time: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in timings.items()))
    lines.append(f"peak memory: {report['peak_memory']['host_rss_mb']:.0f} MB host RSS")
    evaluation = report.get("evaluation")
    if evaluation:
        for dataset, by_seqlen in evaluation["dense"]["perplexity"].items():
            for seqlen, dense in by_seqlen.items():
                compressed = evaluation["compressed"]["perplexity"][dataset][seqlen]
                lines.append(f"perplexity {dataset} @ {seqlen}: dense {dense:.3f} -> compressed {compressed:.3f}")
    lines.append(f"saved to {report['output']}")
    return "\n".join(lines)
