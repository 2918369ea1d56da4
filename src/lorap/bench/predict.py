"""Predicted speedup of a plan, before compressing: a quick micro-benchmark of its layers.

`lorap bench` times whole models; that takes minutes and the memory of two models. A plan needs an
answer in seconds, from shapes alone. So one small model is built with random weights: the
embeddings and LM head once, one dense decoder layer, and a few decoder layers with the plan's
compressed shapes (the distinct layer layouts, or at most MAX_SAMPLED_LAYERS of them spanning the
range of layer sizes). Forward hooks (timing.LayerClock) time every layer of it, at a prefill of PREFILL_TOKENS tokens
and at one token (a decode step), in the runtime checkpoints load with (fused q/k/v right factors).

    predicted time = rest + sum over the model's layers of that layer's measured time

where `rest` (embeddings, rotary table, final norm, LM head, the loop between layers) is the same for
dense and compressed. Layers whose layout was not sampled take the time of their size, interpolated
linearly in parameters between the nearest sampled layouts. The prediction is a ratio of medians on
this machine, as it is loaded now; `lorap bench` measures the real thing.
"""
import bisect
import json
import statistics
import time

import torch

from ..architectures import Architecture
from ..families import attention_shapes, ffn_shapes, other_parameters
from ..devices import available_memory_bytes, resolve_device
from .models import random_model
from .timing import LayerClock, prompt_ids, sync

PREFILL_TOKENS = 512
MAX_SAMPLED_LAYERS = 6
BUDGET_SECONDS = 3.0  # per measurement (prefill, decode), beyond the minimum repeats
MAX_REPEATS = 50
# The micro-benchmark model may use at most this share of the memory available now.
MEMORY_SHARE = 0.25


def _layer_parameters(plan) -> list[int]:
    """Parameters of each layer of the compressed model (as Plan.layout(): a layer removed whole has none)."""
    totals = [0] * len(plan.layers)
    for row in plan.rows:
        totals[row["layer"]] += row["parameters"]
    return [total for total, layer in zip(totals, plan.layers) if not layer.removed]


def _sampled_layouts(plan) -> tuple[list, list]:
    """(layouts to time, their parameter counts): every distinct layout, or an even spread of them
    by size (smallest and largest always in) when there are more than MAX_SAMPLED_LAYERS."""
    by_key = {}
    for layout, parameters in zip(plan.layout(), _layer_parameters(plan)):
        by_key.setdefault(json.dumps(layout, sort_keys=True), (parameters, layout))
    distinct = sorted(by_key.values(), key=lambda item: item[0])
    if len(distinct) > MAX_SAMPLED_LAYERS:
        step = (len(distinct) - 1) / (MAX_SAMPLED_LAYERS - 1)
        distinct = [distinct[round(i * step)] for i in range(MAX_SAMPLED_LAYERS)]
    return [layout for _, layout in distinct], [parameters for parameters, _ in distinct]


def _interpolated(sizes: list, times: list, size: int) -> float:
    """A layer's time from the sampled (size, time) points: exact at a sample, linear between two."""
    position = bisect.bisect_left(sizes, size)
    if position < len(sizes) and sizes[position] == size:
        return times[position]
    low, high = max(0, min(position - 1, len(sizes) - 2)), max(0, min(position, len(sizes) - 1))
    if low == high or sizes[high] == sizes[low]:
        return times[low] * size / sizes[low]
    fraction = (size - sizes[low]) / (sizes[high] - sizes[low])
    return times[low] + fraction * (times[high] - times[low])


def _timed_forwards(model, tokens, device, warmup: int, repeats: int, budget_s: float) -> tuple[list, float]:
    """(median seconds of each decoder layer, median seconds of the whole forward): at least
    `repeats` timed forwards, more while they fit in `budget_s` (one layer's time is short, and a
    shared machine's hiccups fall on single layers: more samples make the medians steady)."""
    clock = LayerClock(Architecture(model.config).decoder_layers(model), device)
    totals = []
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(input_ids=tokens, use_cache=False)
            clock.clear()
            while len(totals) < repeats or (sum(totals) < budget_s and len(totals) < MAX_REPEATS):
                sync(device)
                begin = time.perf_counter()
                model(input_ids=tokens, use_cache=False)
                sync(device)
                totals.append(time.perf_counter() - begin)
    finally:
        clock.remove()
    layer_medians = [statistics.median(seconds) for seconds in clock.per_layer]
    return layer_medians, statistics.median(totals)


def _bytes_needed(model_config, layers: int, dtype) -> int:
    """Weights of the micro-benchmark model, counted as dense layers (an upper bound)."""
    timed = _with_layers(model_config, layers)
    per_layer = sum(o * i for o, i, _ in attention_shapes(timed).values()) + sum(
        o * i for o, i, _ in ffn_shapes(timed).values())
    return (other_parameters(timed) + layers * per_layer) * torch.tensor([], dtype=dtype).element_size()


def predict_speedup(model_config, plan, device: str | None = None, dtype: str | None = None,
                    prefill_tokens: int = PREFILL_TOKENS, repeats: int = 3, budget_s: float = BUDGET_SECONDS) -> dict:
    """{"prefill": speedup, "decode": speedup, ...} for `plan` on `model_config`, by micro-benchmark;
    {"skipped": why} when the micro-benchmark model would not fit comfortably in memory now."""
    device = resolve_device(device)
    dtype = dtype or ("float32" if device.type == "cpu" else "bfloat16")
    torch_dtype = getattr(torch, dtype)
    layouts, sizes = _sampled_layouts(plan)
    needed, available = _bytes_needed(model_config, 1 + len(layouts), torch_dtype), available_memory_bytes()
    if device.type == "cpu" and available is not None and needed > MEMORY_SHARE * available:
        return {"skipped": f"the micro-benchmark model needs {needed / 2**30:.1f} GiB, more than "
                           f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available; time it with `lorap bench --layers 1`"}
    # One dense layer first (the layout {} changes nothing), then the sampled compressed layouts.
    model = random_model(_with_layers(model_config, 1 + len(layouts)), torch_dtype, device,
                         layout=[{}, *layouts], fuse=True)
    per_layer_sizes = _layer_parameters(plan)
    result = {"device": device.type, "dtype": dtype, "threads": torch.get_num_threads(),
              "sampled_layouts": len(layouts), "layers": len(plan.layers)}
    for label, length in (("prefill", prefill_tokens), ("decode", 1)):
        tokens = prompt_ids(model.config.vocab_size, length, device)
        layer_times, total = _timed_forwards(model, tokens, device, 1, repeats, budget_s)
        dense_layer, compressed_samples = layer_times[0], layer_times[1:]
        rest = max(0.0, total - sum(layer_times))
        dense = rest + len(plan.layers) * dense_layer
        compressed = rest + sum(_interpolated(sizes, compressed_samples, size) for size in per_layer_sizes)
        result[label] = {"tokens": length, "dense_ms": dense * 1000, "compressed_ms": compressed * 1000,
                         "speedup": dense / compressed}
    del model
    return result


def _with_layers(model_config, layers: int):
    """A config with `layers` decoder layers (more than the model has: a tiny model sampled whole)."""
    import copy

    config = copy.deepcopy(model_config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = (config.layer_types * layers)[:layers]
    return config
