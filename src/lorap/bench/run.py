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
import copy
import os
import statistics

import torch

from ..devices import resolve_device
from ..errors import LorapError
from ..families import keep_layers
from ..log import info
from ..plan.counting import count_parameters
from ..provenance import environment
from .models import first_layers, random_model
from .settings import BenchTiming
from ..architectures import Architecture
from .timing import LayerClock, decode_throughputs, paired_ratio, prefill_latencies

DTYPES = ("float32", "bfloat16", "float16")


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _models(model, config, layers, dtype, device, fuse) -> tuple:
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
        compressed, _, _ = load_model(model, dtype=dtype, device=str(device), fuse=fuse)
        base = compressed.config.lorap.get("base_model")
        dense, _, _ = load_model(base, dtype=dtype, device=str(device))
        return dense, compressed, {"weights": "real", "source": described, "base_model": base or "built-in default",
                                   "plan": None, "layers_in_model": dense.config.num_hidden_layers}
    if config is None:
        raise LorapError("give --ratio (the plan to time), or a lorap checkpoint folder to time its real weights")
    model_config = load_config(model)
    plan = make_plan(model_config, config.plan_settings())
    timed = first_layers(model_config, layers)
    dense = random_model(timed, dtype, device)
    compressed_config = timed
    if plan.removed_layers:  # a smaller model: the kept layers only
        if layers is not None:
            raise LorapError("--layers times the first N layers of both models; a plan that removes whole layers "
                             "is timed whole")
        compressed_config = copy.deepcopy(model_config)
        keep_layers(compressed_config, [layer.index for layer in plan.layers if not layer.removed])
    compressed = random_model(compressed_config, dtype, device, layout=plan.layout(), fuse=fuse)
    return dense, compressed, {"weights": "random (built from shapes)", "source": described,
                               "plan": plan.to_dict()["totals"], "layers_in_model": model_config.num_hidden_layers}


def bench(model=None, config=None, timing: BenchTiming | None = None, layers: int | None = None, dtype: str = "float32",
          device: str | None = None, fuse: bool = True) -> dict:
    """Time dense and compressed side by side, as `timing` says; `config` is a CompressionConfig (its
    plan's shapes), or None for a lorap checkpoint (its own shapes and weights). `fuse` False times
    the compressed model as its pairs are saved (no shared right-factor GEMM, left factors
    row-major: modeling_lorap.optimize_for_inference), to show that runtime's gain."""
    timing = timing or BenchTiming()
    if dtype not in DTYPES:
        raise LorapError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    timing.validate()
    device = resolve_device(device)
    load_before = _load_average()
    dense, compressed, built = _models(model, config, layers, getattr(torch, dtype), device, fuse)
    models = {"dense": dense, "compressed": compressed}
    report = {
        **built,
        "layers_timed": dense.config.num_hidden_layers,
        "layers_note": (f"the first {layers} decoder layers plus embeddings, final norm and LM head" if layers else
                        "every decoder layer"),
        "settings": config.to_dict() if built["weights"] != "real" else compressed.config.lorap["compression"],
        "dtype": dtype,
        "parameters": {label: count_parameters(m) for label, m in models.items()},
        "runtime": ("q/k/v right factors fused into one GEMM, left factors column-major on the CPU" if fuse else
                    "every factor pair runs its own two GEMMs on its weights as saved"),
        "protocol": {"warmup": timing.warmup, "repeats": timing.repeats, "interleaved": True,
                     "prompt_tokens": timing.prompt_tokens, "new_tokens": timing.new_tokens,
                     "threads": torch.get_num_threads(),
                     "speedup": "median of dense / compressed over rounds timed back to back; decode: over tokens "
                                "generated in lockstep, one token each in turn",
                     "timer": "CUDA events" if device.type == "cuda" else "wall clock"},
    }
    scale = built["layers_in_model"] / report["layers_timed"]
    report["prefill"], report["decode"] = time_side_by_side(models, device, timing, scale)
    if timing.compiled_decode:
        report["decode_compiled"] = time_compiled_decode(models, timing)
    report["load_average"] = {"before": load_before, "after": _load_average()}
    report.update(environment(str(device)))
    return report


def time_side_by_side(models: dict, device, timing: BenchTiming, scale: float = 1.0) -> tuple[dict, dict]:
    """(prefill rows by "BATCHxTOKENS", decode row) of {"dense": model, "compressed": model} timed
    interleaved, with paired speedups for the whole forward and for the decoder layers alone (by
    hooks); `scale` (model layers / timed layers) > 1 adds the whole model extrapolated."""
    limit = getattr(models["dense"].config, "max_position_embeddings", None) or max(timing.prefill_seqlens)
    shapes = [(batch, seqlen) for batch in timing.batches for seqlen in timing.prefill_seqlens if seqlen <= limit]
    timed_prefills, (decode, decode_inside) = time_inside_layers(models, device, shapes, timing.prompt_tokens,
                                                                 timing.new_tokens, timing.warmup, timing.repeats,
                                                                 max(1, timing.repeats))
    prefill = {}
    for (batch, seqlen), (timed, inside) in timed_prefills.items():
        rounds = {label: timed[label]["rounds_ms"] for label in models}
        prefill[f"{batch}x{seqlen}"] = {"batch": batch, "tokens": seqlen, **timed, **_paired_speedups(rounds, inside, scale)}
    steps = {label: decode[label]["steps_ms"] for label in models}
    decode.update(_paired_speedups(steps, decode_inside, scale))
    return prefill, decode


def time_compiled_decode(models: dict, timing: BenchTiming) -> dict:
    """Decode as serving engines run it (timing.CompiledGeneration), timed interleaved with the whole-step
    paired speedup only: hooks inside the layers would break the compiled graph."""
    info(f"decode, compiled: {timing.new_tokens} tokens after a {timing.prompt_tokens}-token prompt, static KV cache")
    decode = decode_throughputs(models, timing.prompt_tokens, timing.new_tokens, timing.warmup, max(1, timing.repeats),
                                compiled=True)
    whole = paired_ratio(decode["dense"]["steps_ms"], decode["compressed"]["steps_ms"])
    return {**decode, "speedup": whole["median"], "speedup_quartiles": [whole["low_quartile"], whole["high_quartile"]]}


def time_inside_layers(models: dict, device, prefill_shapes, prompt_tokens: int, new_tokens: int, warmup: int,
                       repeats: int, decode_repeats: int) -> tuple[dict, tuple]:
    """Any number of models timed interleaved, whole and inside their decoder layers (forward hooks):
    ({(batch, tokens): (prefill_latencies' report, {label: ms inside the layers, each timed round})},
    (decode_throughputs' report, {label: ms inside the layers, each timed token}))."""
    clocks = {label: LayerClock(Architecture(m.config).decoder_layers(m), device) for label, m in models.items()}
    prefill = {}
    try:
        for batch, seqlen in prefill_shapes:
            info(f"prefill: batch {batch} x {seqlen} tokens")
            timed = prefill_latencies(models, seqlen, batch, warmup, repeats)
            prefill[(batch, seqlen)] = timed, {label: [s * 1000 for s in clock.seconds(seqlen, skip=warmup)]
                                               for label, clock in clocks.items()}
            for clock in clocks.values():
                clock.clear()
        info(f"decode: {new_tokens} tokens after a {prompt_tokens}-token prompt, the models in lockstep")
        decode = decode_throughputs(models, prompt_tokens, new_tokens, warmup, decode_repeats)
        # The clocks saw the warm-up tokens too, as many for each model: the timed ones are the last.
        inside = {label: [s * 1000 for s in clock.seconds(1)][-len(decode[label]["steps_ms"]):]
                  for label, clock in clocks.items()}
    finally:
        for clock in clocks.values():
            clock.remove()
    return prefill, (decode, inside)


def _paired_speedups(totals: dict, inside: dict, scale: float) -> dict:
    """Speedups (dense / compressed) of one measurement, each the median of per-round ratios
    (timing.paired_ratio) with its quartiles: of the whole forward (`totals`, ms per round or per
    token), of the decoder layers alone (`inside`, the same rounds by hooks), and (when only some
    layers were timed) of the whole model extrapolated: each round's time outside the layers once,
    plus its layers' time scaled to every layer of the model."""
    whole = paired_ratio(totals["dense"], totals["compressed"])
    layers = paired_ratio(inside["dense"], inside["compressed"])
    split = {"speedup": whole["median"], "speedup_quartiles": [whole["low_quartile"], whole["high_quartile"]],
             "layers_ms": {label: statistics.median(values) for label, values in inside.items()},
             "layers_speedup": layers["median"], "layers_speedup_quartiles": [layers["low_quartile"], layers["high_quartile"]]}
    if scale != 1:
        extrapolated = {label: [total - layer + scale * layer for total, layer in zip(totals[label], inside[label])]
                        for label in totals}
        ratio = paired_ratio(extrapolated["dense"], extrapolated["compressed"])
        split["whole_model_ms_extrapolated"] = {label: statistics.median(values) for label, values in extrapolated.items()}
        split["whole_model_speedup_extrapolated"] = ratio["median"]
    return split


def format_bench(report: dict) -> str:
    params = report["parameters"]
    lines = [
        f"{report['source']}: {report['weights']}, {report['dtype']}, {report['device']['type']} "
        f"({report['device']['name']}, {report['device']['threads']} threads), "
        f"{report['layers_timed']} layers timed ({report['layers_note']}); compressed runtime: {report['runtime']}",
        f"parameters timed: dense {params['dense']:,}, compressed {params['compressed']:,} "
        f"({params['dense'] / params['compressed']:.2f}x fewer)",
        f"{'prefill':<18}{'dense ms':>18}{'compressed ms':>18}{'speedup':>20}{'layers only':>20}{_whole_header(report):>18}",
    ]
    for key, row in report["prefill"].items():
        cells = [f"{row[m]['median_ms']:.1f} ±{row[m]['iqr_ms'] / 2:.1f}" for m in ("dense", "compressed")]
        lines.append(f"{'batch ' + key:<18}{cells[0]:>18}{cells[1]:>18}{paired_speedup_text(row):>20}"
                     f"{paired_speedup_text(row, 'layers_speedup'):>20}{_whole_cell(row):>18}")
    decode = report["decode"]
    lines.append(
        f"decode tokens/s: dense {decode['dense']['median_tokens_per_s']:.1f}, compressed "
        f"{decode['compressed']['median_tokens_per_s']:.1f} ({paired_speedup_text(decode)}; decoder layers only "
        f"{paired_speedup_text(decode, 'layers_speedup')}"
        + (f"; whole model extrapolated {_whole_cell(decode).strip()}"
           if "whole_model_speedup_extrapolated" in decode else "") + ")"
    )
    if "decode_compiled" in report:
        compiled = report["decode_compiled"]
        lines.append(f"decode tokens/s, compiled (static KV cache, torch.compile): dense "
                     f"{compiled['dense']['median_tokens_per_s']:.1f}, compressed "
                     f"{compiled['compressed']['median_tokens_per_s']:.1f} ({paired_speedup_text(compiled)})")
    lines.append("speedups: the median of dense / compressed over rounds timed back to back (decode: over tokens "
                 "generated in lockstep), [quartiles of those ratios]")
    if "whole_model_speedup_extrapolated" in decode:
        lines.append(f"extrapolated: time outside the layers as measured, plus the timed layers' median scaled to all "
                     f"{report['layers_in_model']} layers")
    load = report["load_average"]
    if load["before"] is not None:
        lines.append(f"machine load (1-minute average): {load['before']:.1f} before, {load['after']:.1f} after")
    if report["weights"] != "real":
        lines.append("weights are random: speed depends on shapes alone, not on the values")
    return "\n".join(lines)


def paired_speedup_text(row: dict, key: str = "speedup") -> str:
    """'1.23x [1.19-1.26]': a paired speedup and the quartiles of its ratios."""
    low, high = row[f"{key}_quartiles"]
    return f"{row[key]:.2f}x [{low:.2f}-{high:.2f}]"


def _whole_header(report: dict) -> str:
    return f"all {report['layers_in_model']} (extrap.)" if report["layers_in_model"] != report["layers_timed"] else ""


def _whole_cell(row: dict) -> str:
    value = row.get("whole_model_speedup_extrapolated")
    return f"{value:.2f}x" if value is not None else ""


def bench_markdown(report: dict) -> str:
    """The same numbers as format_bench, as a markdown table (for docs/)."""
    params = report["parameters"]
    lines = [
        f"{report['source']}; weights {report['weights']}; {report['dtype']}; {report['device']['type']} "
        f"({report['device']['name']}, {report['device']['threads']} threads); {report['layers_timed']} layers timed "
        f"({report['layers_note']}); compressed runtime: {report['runtime']}; parameters timed {params['dense']:,} dense, {params['compressed']:,} compressed "
        f"({params['dense'] / params['compressed']:.2f}x fewer). Speedups: the median of dense / compressed over "
        "rounds timed back to back (decode: over tokens generated in lockstep), with the quartiles of those ratios.",
        "",
        "| prefill (batch x tokens) | dense ms (median, IQR) | compressed ms | speedup [quartiles] | "
        f"decoder layers only | whole model, extrapolated to {report['layers_in_model']} layers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in report["prefill"].items():
        cells = [f"{row[m]['median_ms']:.1f} ({row[m]['iqr_ms']:.1f})" for m in ("dense", "compressed")]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {paired_speedup_text(row)} | "
                     f"{paired_speedup_text(row, 'layers_speedup')} | {_whole_cell(row) or 'timed whole'} |")
    decode = report["decode"]
    lines.append(f"| decode tokens/s (min-max), {decode['dense']['new_tokens']} after {decode['dense']['prompt_tokens']} "
                 f"| {_rates(decode)} | {paired_speedup_text(decode)} | {paired_speedup_text(decode, 'layers_speedup')} | "
                 f"{_whole_cell(decode) or 'timed whole'} |")
    if "decode_compiled" in report:
        compiled = report["decode_compiled"]
        lines.append(f"| decode tokens/s, compiled (static KV cache, torch.compile) | {_rates(compiled)} | "
                     f"{paired_speedup_text(compiled)} | - | timed whole |")
    return "\n".join(lines)


def _rates(decode: dict) -> str:
    """'31.4 (30.9-32.0) | 40.1 (39.2-41.0)': dense and compressed tokens/s, median (min-max)."""
    return " | ".join(f"{decode[m]['median_tokens_per_s']:.1f} ({decode[m]['min_tokens_per_s']:.1f}-"
                      f"{decode[m]['max_tokens_per_s']:.1f})" for m in ("dense", "compressed"))
