"""`lorap bench`: how much faster the compressed model runs than the dense one, measured.

Two ways to get the pair of models:
  shapes   MODEL is a config.json, a model folder, a hub id or nothing (the built-in model): both
           models are built from shapes with random weights, the compressed one by the plan of
           --ratio / --preset (so LLaMA-7B shapes run here without a checkpoint; --layers N keeps
           the first N decoder layers plus the embeddings and LM head, for models too big for memory);
  real     MODEL is a lorap checkpoint: it and the base model its config names, real weights.
Prefill (batch x tokens, no cache) and decode (tokens/s with the KV cache after a prompt) are timed
with dense and compressed interleaved (timing.py); the report gives medians, their spread, the
speedups (dense time / compressed time) and the machine's load.
"""
import os

import torch

from ..devices import resolve_device
from ..errors import LorapError
from ..log import info
from ..plan.counting import count_parameters
from ..provenance import environment
from .models import first_layers, random_model
from .timing import decode_throughputs, prefill_latencies

DTYPES = ("float32", "bfloat16", "float16")
PREFILL_SEQLENS = (128, 512, 2048)
BATCHES = (1, 8)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _models(model, config, layers, dtype, device) -> tuple:
    """(dense, compressed, what was built) for `model` (see the module docstring)."""
    from ..io.models import load_config, load_model, resolve_model
    from ..plan.plan import make_plan

    if model is not None and str(model).endswith(".json"):  # shapes alone, as `lorap plan` reads them
        described = f"{model} (config.json)"
        source = None
    else:
        source = resolve_model(model)
        described = source.describe()
    if source is not None and source.kind == "lorap":
        if layers is not None:
            raise LorapError("--layers builds models from shapes; a lorap checkpoint is timed whole, with its real weights")
        compressed, _, _ = load_model(model, dtype=dtype, device=str(device))
        base = compressed.config.lorap.get("base_model")
        dense, _, _ = load_model(base, dtype=dtype, device=str(device))
        return dense, compressed, {"weights": "real", "source": described, "base_model": base or "built-in default",
                                   "plan": None}
    if config is None:
        raise LorapError("give --ratio (the plan to time), or a lorap checkpoint folder to time its real weights")
    model_config = load_config(model)
    plan = make_plan(model_config, config.plan_settings())
    timed = first_layers(model_config, layers)
    dense = random_model(timed, dtype, device)
    compressed = random_model(timed, dtype, device, layout=plan.layout())
    return dense, compressed, {"weights": "random (built from shapes)", "source": described,
                               "plan": plan.to_dict()["totals"]}


def bench(model=None, config=None, layers: int | None = None, dtype: str = "float32", device: str | None = None,
          prefill_seqlens=PREFILL_SEQLENS, batches=BATCHES, prompt_tokens: int = 128, new_tokens: int = 128,
          warmup: int = 1, repeats: int = 5) -> dict:
    """Time dense and compressed side by side; `config` is a CompressionConfig (its plan's shapes),
    or None for a lorap checkpoint (its own shapes and weights)."""
    if dtype not in DTYPES:
        raise LorapError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = resolve_device(device)
    for name, values in (("prefill lengths", prefill_seqlens), ("batch sizes", batches)):
        if not values or any(not isinstance(v, int) or v <= 0 for v in values):
            raise LorapError(f"{name} must be positive integers, got {values!r}")
    load_before = _load_average()
    dense, compressed, built = _models(model, config, layers, getattr(torch, dtype), device)
    models = {"dense": dense, "compressed": compressed}
    report = {
        **built,
        "layers_timed": dense.config.num_hidden_layers,
        "layers_note": (f"the first {layers} decoder layers plus embeddings, final norm and LM head" if layers else
                        "every decoder layer"),
        "settings": config.to_dict() if built["weights"] != "real" else compressed.config.lorap["compression"],
        "dtype": dtype,
        "parameters": {label: count_parameters(m) for label, m in models.items()},
        "prefill": {},
        "decode": None,
        "protocol": {"warmup": warmup, "repeats": repeats, "interleaved": True, "prompt_tokens": prompt_tokens,
                     "new_tokens": new_tokens, "threads": torch.get_num_threads(),
                     "timer": "CUDA events" if device.type == "cuda" else "wall clock"},
    }
    limit = getattr(dense.config, "max_position_embeddings", None) or max(prefill_seqlens)
    for batch in batches:
        for seqlen in prefill_seqlens:
            if seqlen > limit:
                continue
            info(f"prefill: batch {batch} x {seqlen} tokens")
            timed = prefill_latencies(models, seqlen, batch, warmup, repeats)
            timed["speedup"] = timed["dense"]["median_ms"] / timed["compressed"]["median_ms"]
            report["prefill"][f"{batch}x{seqlen}"] = {"batch": batch, "tokens": seqlen, **timed}
    info(f"decode: {new_tokens} tokens after a {prompt_tokens}-token prompt")
    decode = decode_throughputs(models, prompt_tokens, new_tokens, warmup, max(1, repeats))
    decode["speedup"] = decode["compressed"]["median_tokens_per_s"] / decode["dense"]["median_tokens_per_s"]
    report["decode"] = decode
    report["load_average"] = {"before": load_before, "after": _load_average()}
    report.update(environment(str(device)))
    return report


def format_bench(report: dict) -> str:
    params = report["parameters"]
    lines = [
        f"{report['source']}: {report['weights']}, {report['dtype']}, {report['device']['type']} "
        f"({report['device']['name']}, {report['device']['threads']} threads), "
        f"{report['layers_timed']} layers timed ({report['layers_note']})",
        f"parameters timed: dense {params['dense']:,}, compressed {params['compressed']:,} "
        f"({params['dense'] / params['compressed']:.2f}x fewer)",
        f"{'prefill':<18}{'dense ms':>18}{'compressed ms':>18}{'speedup':>10}",
    ]
    for key, row in report["prefill"].items():
        cells = [f"{row[m]['median_ms']:.1f} ±{row[m]['iqr_ms'] / 2:.1f}" for m in ("dense", "compressed")]
        lines.append(f"{'batch ' + key:<18}{cells[0]:>18}{cells[1]:>18}{row['speedup']:>9.2f}x")
    decode = report["decode"]
    lines.append(
        f"decode tokens/s: dense {decode['dense']['median_tokens_per_s']:.1f}, compressed "
        f"{decode['compressed']['median_tokens_per_s']:.1f} ({decode['speedup']:.2f}x)"
    )
    load = report["load_average"]
    if load["before"] is not None:
        lines.append(f"machine load (1-minute average): {load['before']:.1f} before, {load['after']:.1f} after")
    if report["weights"] != "real":
        lines.append("weights are random: speed depends on shapes alone, not on the values")
    return "\n".join(lines)


def bench_markdown(report: dict) -> str:
    """The same numbers as format_bench, as a markdown table (for docs/)."""
    params = report["parameters"]
    lines = [
        f"{report['source']}; weights {report['weights']}; {report['dtype']}; {report['device']['type']} "
        f"({report['device']['name']}, {report['device']['threads']} threads); {report['layers_timed']} layers timed "
        f"({report['layers_note']}); parameters timed {params['dense']:,} dense, {params['compressed']:,} compressed "
        f"({params['dense'] / params['compressed']:.2f}x fewer).",
        "",
        "| prefill (batch x tokens) | dense ms (median, IQR) | compressed ms | speedup |",
        "|---|---:|---:|---:|",
    ]
    for key, row in report["prefill"].items():
        cells = [f"{row[m]['median_ms']:.1f} ({row[m]['iqr_ms']:.1f})" for m in ("dense", "compressed")]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {row['speedup']:.2f}x |")
    decode = report["decode"]
    rates = [f"{decode[m]['median_tokens_per_s']:.1f} ({decode[m]['min_tokens_per_s']:.1f}-{decode[m]['max_tokens_per_s']:.1f})"
             for m in ("dense", "compressed")]
    lines.append(f"| decode tokens/s (min-max), {decode['dense']['new_tokens']} after {decode['dense']['prompt_tokens']} "
                 f"| {rates[0]} | {rates[1]} | {decode['speedup']:.2f}x |")
    return "\n".join(lines)
