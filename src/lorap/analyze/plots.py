"""PNG plots of `lorap analyze`: spectra, cumulative energy, and low-rank degree per layer and type.

Attention projections are drawn solid and FFN projections dashed in every plot, so the
paper's claim (attention far more low-rank) can be read at a glance, or seen to fail.
"""
from pathlib import Path

from .spectra import ATTENTION, PROJECTIONS, VARIANTS

STYLE = {name: ("-" if name in ATTENTION else "--") for name in PROJECTIONS}
TITLES = {"plain": "plain: W", "weighted": "activation-weighted: W diag(s)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _header(result: dict) -> str:
    cal = result["calibration"]
    return (f"{result['model']} — calibration {cal['samples']} x {cal['seqlen']} tokens of {cal['source']} "
            f"({cal['split']}), {result['date'][:10]}")


def _two_panels(title: str, result: dict):
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2), sharey=True)
    fig.suptitle(f"{title}\n{_header(result)}", fontsize=9)
    return fig, axes


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return str(path)


def spectra_plot(result: dict, path: Path) -> str:
    fig, axes = _two_panels("Singular values / largest, mean over layers (solid: attention, dashed: FFN)", result)
    for ax, variant in zip(axes, VARIANTS):
        for name in PROJECTIONS:
            values = result["spectra"][name][variant]["normalized_singular_values"]
            positions = [i / len(values) for i in range(len(values))]
            ax.plot(positions, values, STYLE[name], label=name, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("index / full rank")
        ax.set_title(TITLES[variant], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("sigma_i / sigma_0")
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def energy_plot(result: dict, path: Path) -> str:
    energy = result["energy"]
    fig, axes = _two_panels(f"Cumulative spectral energy, mean over layers (dotted line: {energy:.0%})", result)
    for ax, variant in zip(axes, VARIANTS):
        for name in PROJECTIONS:
            values = result["spectra"][name][variant]["cumulative_energy"]
            ax.plot([(i + 1) / len(values) for i in range(len(values))], values, STYLE[name], label=name, linewidth=1.2)
        ax.axhline(energy, color="gray", linestyle=":")
        ax.set_xlabel("rank kept / full rank")
        ax.set_title(TITLES[variant], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of sum(sigma^2)")
    axes[1].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def by_layer_plot(result: dict, path: Path) -> str:
    energy = result["energy"]
    fig, axes = _two_panels(f"Low-rank degree per layer: rank fraction keeping {energy:.0%} of the energy (lower = more low-rank)", result)
    for ax, variant in zip(axes, VARIANTS):
        for name in PROJECTIONS:
            rows = sorted((m["layer"], m[variant]["fraction"]) for m in result["matrices"] if m["projection"] == name)
            ax.plot([r[0] for r in rows], [r[1] for r in rows], STYLE[name], marker=".", label=name, linewidth=1)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.25)  # headroom above 1 keeps the legend off the lines
        ax.set_title(TITLES[variant], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rank fraction")
    axes[1].legend(fontsize=7, ncol=4, loc="upper center")
    return _save(fig, path)


def summary_plot(result: dict, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, variant in enumerate(VARIANTS):
        values = [result["by_projection"][name][variant]["mean_fraction"] for name in PROJECTIONS]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(PROJECTIONS))], values, width, label=TITLES[variant],
                      color=("#4c72b0", "#dd8452")[i])
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.0%}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    ax.axvline(len(ATTENTION) - 0.5, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(PROJECTIONS)))
    ax.set_xticklabels([f"{n}\n{'x'.join(map(str, result['by_projection'][n]['shape']))}" for n in PROJECTIONS], fontsize=8)
    ax.set_ylabel(f"rank fraction for {result['energy']:.0%} energy\n(mean over layers; lower = more low-rank)")
    ax.set_ylim(0, 1.1)
    verdict = result.get("finding", {}).get("weighted", {}).get("verdict", "")
    ax.set_title(f"Attention (left) vs FFN (right): paper's observation {verdict}\n{_header(result)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def write_plots(result: dict, folder, prefix: str = "") -> dict:
    folder = Path(folder)
    return {
        "summary": summary_plot(result, folder / f"{prefix}summary.png"),
        "spectra": spectra_plot(result, folder / f"{prefix}spectra.png"),
        "energy": energy_plot(result, folder / f"{prefix}energy.png"),
        "by_layer": by_layer_plot(result, folder / f"{prefix}by_layer.png"),
    }
