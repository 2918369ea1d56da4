"""The evaluation report as terminal text and as markdown. Numbers are taken as given."""


def entries(report: dict) -> list[dict]:
    """The evaluated model first, then the one it is compared with (if any)."""
    return [report, report["against"]] if "against" in report else [report]


def format_text(report: dict) -> str:
    """Plain lines for the terminal (the perplexity lines keep report.format_perplexity's form)."""
    from ..report import format_perplexity

    lines = []
    for entry in entries(report):
        if lines:
            lines.append("")
        lines.append(format_perplexity(entry))
        for task, row in entry.get("zeroshot", {}).items():
            norm = f", acc_norm {row['acc_norm']:.4f}" if row["acc_norm"] is not None else ""
            label = " (proxy)" if row["proxy"] else ""
            lines.append(f"zero-shot {task}{label}: acc {row['acc']:.4f}{norm} (n={row['n']})")
        if entry.get("zeroshot_average") is not None:
            lines.append(f"zero-shot average of quoted metrics: {entry['zeroshot_average']:.4f}")
        if "efficiency" in entry:
            eff = entry["efficiency"]
            lines.append(f"MACs per token @ {eff['macs_per_token']['seqlen']}: {eff['macs_per_token']['total']:,}")
            if "kv_cache_bytes_per_token" in eff:  # reports written before it was recorded lack it
                lines.append(f"KV cache: {eff['kv_cache_bytes_per_token']:,} bytes per token of context")
            for seqlen, t in eff["prefill"].items():
                lines.append(f"prefill {seqlen} tokens: {t['median_ms']:.1f} ms (min {t['min_ms']:.1f}, max {t['max_ms']:.1f})")
            lines.append(f"decode: {eff['decode']['median_tokens_per_s']:.1f} tokens/s")
            if eff["memory"].get("peak_bytes"):
                lines.append(f"peak memory: {eff['memory']['peak_bytes'] / 2**20:.0f} MiB ({eff['memory']['kind']})")
    if "comparison" in report:
        removed = report["comparison"]["parameters_removed"]
        lines += ["", f"{report['model']} vs {report['against']['model']}: {removed:.2%} fewer parameters"]
        lines += speed_verdict(report)
    lines.extend(f"note: {note}" for note in report.get("notes", []))
    return "\n".join(lines)


def speed_verdict(report: dict) -> list[str]:
    """Plain sentences on whether the evaluated model is faster than the one it is compared with."""
    comparison = report.get("comparison", {})
    if "decode_speedup" not in comparison:
        return []
    name, other = report["model"], report["against"]["model"]
    how = ("paired medians, timed side by side" if comparison.get("speed_timing", "").startswith("side by side")
           else "ratio of separately timed medians")

    def sentence(what, speedup):
        if speedup is None:
            return f"{what}: not measured for both models"
        verdict = "faster" if speedup > 1 else "NOT faster (slower)" if speedup < 1 else "exactly as fast"
        return f"{what}: {name} is {verdict} than {other} ({speedup:.2f}x the speed, {how})"

    lines = [sentence(f"prefill {seqlen} tokens", speedup) for seqlen, speedup in comparison["prefill_speedup"].items()]
    lines.append(sentence("decode", comparison["decode_speedup"]))
    return lines


def _row(label: str, values) -> str:
    return "| " + " | ".join([label, *values]) + " |"


def _table(header: list[str], rows: list[str]) -> list[str]:
    return [_row(header[0], header[1:]), "|" + "---|" * len(header), *rows, ""]


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _spread_ms(t: dict) -> str:
    return f"{t['median_ms']:.1f} ({t['min_ms']:.1f}–{t['max_ms']:.1f})"


def _perplexity_rows(models: list[dict]) -> list[str]:
    rows = []
    for dataset, by_seqlen in models[0]["perplexity"].items():
        for seqlen in by_seqlen:
            values = [_num(m["perplexity"].get(dataset, {}).get(seqlen), ".3f") for m in models]
            rows.append(_row(f"perplexity {dataset} @ {seqlen}", values))
    return rows


def _zeroshot_rows(models: list[dict]) -> list[str]:
    rows = []
    for task, first in models[0].get("zeroshot", {}).items():
        name = f"{task} (proxy)" if first["proxy"] else task
        for metric in ("acc", "acc_norm"):
            if first[metric] is None:
                continue
            quoted = " **(quoted)**" if metric == first["published_metric"] else ""
            values = []
            for m in models:
                row = m.get("zeroshot", {}).get(task)
                values.append("n/a" if row is None or row[metric] is None
                              else f"{row[metric]:.4f} ± {_num(row[f'{metric}_stderr'], '.4f')}")
            rows.append(_row(f"{name} {metric}{quoted}", values))
    if models[0].get("zeroshot_average") is not None:
        rows.append(_row("average of quoted metrics", [_num(m.get("zeroshot_average"), ".4f") for m in models]))
    return rows


def _efficiency_rows(models: list[dict]) -> list[str]:
    effs = [m["efficiency"] for m in models]
    first = effs[0]
    rows = [
        _row("weights (MiB)", [f"{e['weight_bytes'] / 2**20:.1f} ({e['dtype']})" for e in effs]),
        _row(f"MACs per token @ {first['macs_per_token']['seqlen']} (shapes)", [f"{e['macs_per_token']['total']:,}" for e in effs]),
        _row("MACs agree with torch flop counter", ["yes" if e["macs_agree"] else f"no ({e['macs_per_token_counted']:,.0f})" for e in effs]),
        _row("KV cache, bytes per token of context", [_num(e.get("kv_cache_bytes_per_token"), ",") for e in effs]),
    ]
    for seqlen in first["prefill"]:
        rows.append(_row(f"prefill {seqlen} tokens, ms: median (min–max)",
                         [_spread_ms(e["prefill"][seqlen]) if seqlen in e["prefill"] else "n/a" for e in effs]))
    rows.append(_row(f"decode tokens/s after {first['decode']['prompt_tokens']}-token prompt: median (min–max)",
                     [f"{e['decode']['median_tokens_per_s']:.1f} ({e['decode']['min_tokens_per_s']:.1f}–{e['decode']['max_tokens_per_s']:.1f})" for e in effs]))
    rows.append(_row(f"peak memory, MiB ({first['memory'].get('kind', 'n/a')})",
                     [_num(e["memory"].get("peak_bytes") and e["memory"]["peak_bytes"] / 2**20, ".0f") for e in effs]))
    return rows


def to_markdown(report: dict, charts: dict | None = None) -> str:
    """A self-contained markdown report; `charts` maps a chart name to a path relative to the file."""
    models = entries(report)
    names = [m["model"] for m in models]
    title = " vs ".join(names)
    lines = [f"# lorap evaluation: {title}", ""]
    lines += [f"{m['model']}: {m['source']}" + ("  " if i < len(models) - 1 else "") for i, m in enumerate(models)]
    lines += [""]
    header = ["", *names]
    lines += ["## Size and perplexity", ""]
    size = [_row("parameters", [f"{m['parameters']:,}" for m in models])]
    if "comparison" in report:
        size.append(_row("parameters removed", [f"{report['comparison']['parameters_removed']:.2%}", "—"]))
    lines += _table(header, size + _perplexity_rows(models))
    if models[0].get("zeroshot"):
        lines += ["## Zero-shot accuracy (0-shot, lm-eval)", "",
                  "Both acc and acc_norm are shown (± standard error); **(quoted)** marks the one published tables use.", ""]
        lines += _table(["task, metric", *names], _zeroshot_rows(models))
    if all("efficiency" in m for m in models):
        settings = models[0]["efficiency"]["settings"]
        lines += [f"## Efficiency (batch {settings['batch']}, {settings['warmup']} warm-up runs, "
                  f"{settings['repeats']} repeats, {settings['threads']} threads)", ""]
        lines += _table(header, _efficiency_rows(models))
        lines += [f"- {sentence}" for sentence in speed_verdict(report)] + ([""] if "comparison" in report else [])
    if charts:
        lines += ["## Charts", ""] + [f"![{name}]({path})" for name, path in charts.items()] + [""]
    lines += ["## Provenance", ""]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    device = report["device"]
    lines += [f"- date: {report['date']}", f"- versions: {versions}",
              f"- device: {device['type']} ({device['name']}, {device['threads']} threads)"]
    for dataset, data in report.get("data", {}).get("perplexity", {}).items():
        lines.append(f"- perplexity data `{dataset}`: {data['corpus']}" + (f", max {data['max_tokens']} tokens" if data.get("max_tokens") else ""))
    for task, row in models[0].get("zeroshot", {}).items():
        where = row["data"].get("file") or f"{row['data'].get('dataset')} ({row['data'].get('config')}, {row['data'].get('split')})"
        lines.append(f"- zero-shot `{task}`: {row['description']}; {row['n']} of {row['n_available']} examples; data {where}")
    lines += [f"- note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"
