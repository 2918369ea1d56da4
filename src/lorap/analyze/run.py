"""`lorap analyze`: load a model, measure its spectra (spectra.py), write JSON and plots (plots.py),
and format the finding."""
from pathlib import Path

from ..devices import default_device
from ..io.files import write_json_atomic
from ..io.models import load_model
from ..plan.counting import count_parameters
from ..provenance import environment
from .plots import write_plots
from .spectra import OUTPUT_PREFIX, VARIANTS, analyze_model, finding


def write_analysis(result: dict, out) -> dict:
    """Write the JSON and the PNG plots into `out`; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{OUTPUT_PREFIX}analysis.json"
    write_json_atomic(json_path, result)
    return {"json": str(json_path), **write_plots(result, out, OUTPUT_PREFIX)}


def analyze(model=None, out=None, calibration="wiki", samples=16, seqlen=128, energy=0.9, seed=0, device=None) -> dict:
    """Load a model by name or path, analyze it, and (with `out`) write the JSON and plots."""
    device = device or default_device()
    loaded, tokenizer, source = load_model(model, device=device)
    result = {"model": source.name, "source": source.describe(), "parameters": count_parameters(loaded)}
    result.update(analyze_model(loaded, tokenizer, calibration, samples, seqlen, energy, seed))
    result["finding"] = finding(result)
    result.update(environment(device))
    if out is not None:
        result["files"] = write_analysis(result, out)
    return result


def format_analysis(result: dict) -> str:
    lines = [f"model: {result['model']}",
             f"rank fraction keeping {result['energy']:.0%} of the spectral energy (mean over layers; min-max)"]
    lines.append(f"{'projection':<12}{'shape':>11}{'plain':>22}{'activation-weighted':>26}")
    for name, row in result["by_projection"].items():
        cells = [f"{row[v]['mean_fraction']:.1%} ({row[v]['min_fraction']:.0%}-{row[v]['max_fraction']:.0%})" for v in VARIANTS]
        lines.append(f"{name:<12}{'x'.join(map(str, row['shape'])):>11}{cells[0]:>22}{cells[1]:>26}")
    lines += [f["sentence"] for f in result["finding"].values()]
    return "\n".join(lines)
