"""The table and plot of `lorap compare`, made from its result dict alone (comparison.json)."""
from pathlib import Path


def _ppl(row: dict, dataset: str, seqlen) -> float | None:
    return row.get("perplexity", {}).get(dataset, {}).get(str(seqlen))


def relative_perplexity(row: dict, dense: dict, datasets: list, seqlen) -> float:
    """The geometric mean over the corpora of the row's perplexity divided by the dense model's:
    1.0 is the dense model, and each corpus counts alike whatever its own scale."""
    import math

    logs = [math.log(_ppl(row, d, seqlen) / _ppl(dense, d, seqlen)) for d in datasets]
    return math.exp(sum(logs) / len(logs))


def ranked(result: dict, ratio: float) -> list:
    """The rows of one ratio, best first by relative perplexity at the first window length; rows
    that failed last."""
    datasets, seqlen = result["evaluation"]["datasets"], result["evaluation"]["seqlens"][0]
    mine = [r for r in result["rows"] if r["ratio"] == ratio]
    done = sorted((r for r in mine if "error" not in r),
                  key=lambda r: relative_perplexity(r, result["dense"], datasets, seqlen))
    return done + [r for r in mine if "error" in r]


def corpus_name(dataset: str) -> str:
    """How a table names a corpus: its own name, or a text file's stem (`fortunes` for .../fortunes.txt)."""
    from ..io.data import POOL_SEPARATOR

    return POOL_SEPARATOR.join(Path(part).stem if "/" in part else part for part in dataset.split(POOL_SEPARATOR))


def _listed(names: list) -> str:
    quoted = [f"`{name}`" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _number(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _bytes(row: dict) -> str:
    value = row.get("kv_cache_bytes_per_token")  # absent from rows saved before it was recorded
    return "-" if value is None else f"{value:,}"


def _where_best_loses(rows: list, columns: list) -> str | None:
    """One sentence for a ratio's table with `best` in it: every corpus and window length where another
    row scores lower perplexity than best, and every row that caches fewer bytes per token."""
    best = next((r for r in rows if r["method"] == "best" and "error" not in r), None)
    if best is None:
        return None
    others = [r for r in rows if r is not best and "error" not in r]
    losses = [f"{r['label']} on `{corpus_name(d)}` @ {s} ({_ppl(r, d, s):.2f} against {_ppl(best, d, s):.2f})"
              for d, s in columns for r in others
              if None not in (_ppl(r, d, s), _ppl(best, d, s)) and _ppl(r, d, s) < _ppl(best, d, s)]
    cache = best.get("kv_cache_bytes_per_token")
    smaller = [f"{r['label']} ({r['kv_cache_bytes_per_token']:,})" for r in others
               if cache is not None and r.get("kv_cache_bytes_per_token") is not None
               and r["kv_cache_bytes_per_token"] < cache]
    sentence = ("Lower perplexity than lorap best: " + "; ".join(losses) + "." if losses else
                "No other row scores lower perplexity than lorap best on any corpus at any window length.")
    if smaller:
        sentence += f" A smaller KV cache than best's {cache:,} bytes per token: " + ", ".join(smaller) + "."
    return sentence


def comparison_markdown(result: dict, plot_file: str | None = None) -> str:
    settings, evaluation = result["settings"], result["evaluation"]
    seqlens, datasets = evaluation["seqlens"], evaluation["datasets"]
    first = seqlens[0]
    files = [d for d in datasets if corpus_name(d) != d]
    corpora = _listed([corpus_name(d) for d in datasets]) + (
        f" ({'; '.join(f'`{corpus_name(d)}`: {d}' for d in files)})" if files else "")
    columns = [(d, s) for s in seqlens for d in datasets]
    tokens = f"the first {evaluation['max_tokens']:,} tokens" if evaluation["max_tokens"] else "all"
    zeroshot = bool(evaluation["tasks"])
    split = evaluation.get("split", "test")
    lines = [
        f"Model: {result['source']}. Calibration: {settings['calibration_samples']} x {settings['calibration_seqlen']} "
        f"tokens of `{settings['calibration_source']}` (train), seed {settings['seed']}, the same for every row. "
        f"Perplexity: {tokens} of the {split} split of {corpora}, non-overlapping windows. "
        "Every method removes the stated share of the whole model's parameters (embeddings and LM head included in "
        "the total, never compressed), counted by the one counting function; rows are ranked by their perplexity at "
        f"{first} tokens relative to the dense model's"
        + (", geometric mean over the corpora ('vs dense')" if len(datasets) > 1 else " ('vs dense')")
        + ". Compress time is the in-memory compression alone (calibration, any scoring pass, layer walk).",
        "",
    ]
    if zeroshot:
        limit = f"{evaluation['limit']} items of each" if evaluation["limit"] else "every item of"
        lines += [f"Zero-shot: mean accuracy over {limit} {', '.join(evaluation['tasks'])}"
                  + (" (lorap's offline proxies, not comparable with published tables)" if any(
                      t.startswith("lorap_") for t in evaluation["tasks"]) else "") + ".", ""]
    dense = result["dense"]
    header = ["rank", "method", "attention", "FFN", "parameters", "removed"] + [f"{corpus_name(d)} @ {s}" for d, s in columns]
    header += [f"vs dense @ {first}"]
    header += ["zero-shot"] if zeroshot else []
    header += ["KV cache (bytes/token)", "compress (s)"]
    for ratio in settings["ratios"]:
        lines += [f"### {ratio:.0%} of the parameters removed", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        dense_cells = ["", "dense", "-", "-", f"{dense['parameters']:,}", "0"] + [_number(_ppl(dense, d, s)) for d, s in columns]
        dense_cells += ["1.00x"]
        dense_cells += [_number(dense.get("zeroshot_average"), 4)] if zeroshot else []
        lines.append("| " + " | ".join(dense_cells + [_bytes(dense), "-"]) + " |")
        for rank, row in enumerate(ranked(result, ratio), 1):
            if "error" in row:
                cells = ["-", row["label"], row["attention"], row["ffn"], "cannot reach this budget", ""]
                cells += [""] * (len(columns) + 1) + ([""] if zeroshot else []) + ["", ""]
            else:
                cells = [str(rank), f"**{row['label']}**" if row["method"] == "best" else row["label"], row["attention"],
                         row["ffn"], f"{row['parameters']:,}", f"{row['removed_fraction']:.2%}"]
                cells += [_number(_ppl(row, d, s)) for d, s in columns]
                cells += [f"{relative_perplexity(row, dense, datasets, first):.2f}x"]
                cells += [_number(row.get("zeroshot_average"), 4)] if zeroshot else []
                cells += [_bytes(row), f"{row['compress_seconds']:.0f}"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        failed = [r for r in result["rows"] if r["ratio"] == ratio and "error" in r]
        lines += [""] + [f"- {r['label']}: {r['error']}" for r in failed] + ([""] if failed else [])
        where = _where_best_loses(ranked(result, ratio), columns)
        lines += [where, ""] if where else []
    if plot_file:
        lines += [f"![perplexity by method]({plot_file})", ""]
    return "\n".join(lines)


def comparison_plot(result: dict, path: Path) -> Path:
    """Perplexity relative to the dense model at the first window length (geometric mean over the
    corpora), one bar per method, one panel per ratio (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = result["settings"]["ratios"]
    seqlen, datasets = result["evaluation"]["seqlens"][0], result["evaluation"]["datasets"]
    figure, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.5), squeeze=False)
    for axis, ratio in zip(axes[0], ratios):
        rows = [r for r in ranked(result, ratio) if "error" not in r]
        labels = [r["label"] for r in rows]
        values = [relative_perplexity(r, result["dense"], datasets, seqlen) for r in rows]
        colors = ["tab:green" if r["method"] == "best" else "tab:blue" if r["method"] == "paper" else "tab:gray" for r in rows]
        axis.barh(labels[::-1], values[::-1], color=colors[::-1])
        axis.axvline(1.0, color="black", linestyle="--", label="dense")
        axis.set_xscale("log")
        axis.set_title(f"{ratio:.0%} of parameters removed")
        split = result["evaluation"].get("split", "test")
        axis.set_xlabel(f"perplexity @ {seqlen} / dense ({', '.join(map(corpus_name, datasets))} {split}; lower is better)")
        axis.legend(loc="lower right")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
