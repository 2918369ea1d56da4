"""PNG charts of an evaluation report, readable without the JSON: every bar carries its
value, every chart names the models, the device and the date, and proxy tasks say so."""
from pathlib import Path

from .render import entries

COLORS = ("#4c72b0", "#dd8452")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _subtitle(report: dict) -> str:
    device = report["device"]
    return f"{device['type']} ({device['name']}, {device['threads']} threads), {report['date'][:10]}"


def _bars(ax, labels: list[str], series: dict[str, list], fmt: str, errors: dict | None = None) -> None:
    """Grouped bars, one group per label and one bar per model, each with its value written on it."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        heights = [v if v is not None else 0 for v in values]
        yerr = errors.get(name) if errors else None
        bars = ax.bar(positions, heights, width, label=name, color=COLORS[i % len(COLORS)], yerr=yerr, capsize=3)
        for bar, value in zip(bars, values):
            text = "n/a" if value is None else format(value, fmt)
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.margins(y=0.15)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return str(path)


def perplexity_chart(report: dict, path: Path) -> str:
    plt = _pyplot()
    models = entries(report)
    labels = [f"{d} @ {s}" for d, by in models[0]["perplexity"].items() for s in by]
    series = {m["model"]: [m["perplexity"].get(d, {}).get(s) for d, by in models[0]["perplexity"].items() for s in by]
              for m in models}
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(labels) + 2), 3.8))
    _bars(ax, labels, series, ".2f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"Perplexity, test split, non-overlapping windows\n{_subtitle(report)}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def zeroshot_chart(report: dict, path: Path) -> str:
    from .zeroshot import headline

    plt = _pyplot()
    models = entries(report)
    rows = models[0]["zeroshot"]
    labels = [f"{t}\n{r['published_metric']}" + (" (proxy)" if r["proxy"] else "") for t, r in rows.items()]
    series = {m["model"]: [headline(m["zeroshot"][t]) if t in m.get("zeroshot", {}) else None for t in rows] for m in models}
    if models[0].get("zeroshot_average") is not None:
        labels.append("average")
        for m in models:
            series[m["model"]].append(m.get("zeroshot_average"))
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(labels) + 2), 4))
    _bars(ax, labels, series, ".3f")
    ax.set_ylim(0, 1.1)  # the whole accuracy scale: small differences are not blown up
    ax.set_ylabel("accuracy, 0-shot (higher is better)")
    proxy = any(r["proxy"] for r in rows.values())
    note = "\nlorap proxy tasks from the wiki test split: NOT comparable with published tables" if proxy else ""
    ax.set_title(f"Zero-shot accuracy (lm-eval){note}\n{_subtitle(report)}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def efficiency_chart(report: dict, path: Path) -> str:
    plt = _pyplot()
    models = entries(report)
    effs = {m["model"]: m["efficiency"] for m in models}
    first = next(iter(effs.values()))
    panels = [
        ("parameters (M)", lambda e: e["parameters"] / 1e6, ".4g", None),
        (f"MACs / token @ {first['macs_per_token']['seqlen']} (M)", lambda e: e["macs_per_token"]["total"] / 1e6, ".4g", None),
    ]
    for seqlen in first["prefill"]:
        panels.append((f"prefill {seqlen} tokens (ms)\nmedian, bars min–max", lambda e, s=seqlen: e["prefill"][s]["median_ms"], ".1f",
                       lambda e, s=seqlen: (e["prefill"][s]["median_ms"] - e["prefill"][s]["min_ms"],
                                            e["prefill"][s]["max_ms"] - e["prefill"][s]["median_ms"])))
    panels.append(("decode (tokens/s)\nmedian, bars min–max", lambda e: e["decode"]["median_tokens_per_s"], ".1f",
                   lambda e: (e["decode"]["median_tokens_per_s"] - e["decode"]["min_tokens_per_s"],
                              e["decode"]["max_tokens_per_s"] - e["decode"]["median_tokens_per_s"])))
    panels.append(("peak memory (MiB)", lambda e: (e["memory"].get("peak_bytes") or 0) / 2**20, ".0f", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 3.6))
    for ax, (title, value, fmt, spread) in zip(axes, panels):
        for i, (name, eff) in enumerate(effs.items()):
            yerr = [[spread(eff)[0]], [spread(eff)[1]]] if spread else None
            bar = ax.bar([i], [value(eff)], 0.6, color=COLORS[i % len(COLORS)], yerr=yerr, capsize=3, label=name)[0]
            ax.annotate(format(value(eff), fmt), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.margins(y=0.2)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Efficiency, batch 1, {first['dtype']} — {_subtitle(report)}", fontsize=9)
    return _save(fig, path)


def write_charts(report: dict, folder, prefix: str = "") -> dict:
    """Write every chart the report has data for; returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    if report.get("perplexity"):
        written["perplexity"] = perplexity_chart(report, folder / f"{prefix}perplexity.png")
    if report.get("zeroshot"):
        written["zero-shot accuracy"] = zeroshot_chart(report, folder / f"{prefix}zeroshot.png")
    if all("efficiency" in m for m in entries(report)):
        written["efficiency"] = efficiency_chart(report, folder / f"{prefix}efficiency.png")
    return written
