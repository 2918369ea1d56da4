"""The sequential layer walk.

Layers are visited in order. Layer i is calibrated on the outputs of layers 0..i-1 *after*
they were compressed, so each layer's compression sees (and can absorb) the error of the
layers before it. Only the layer being processed is on the compute device. The in-memory and
the streamed run both go through `process_layer`, one layer at a time.

A float16 or bfloat16 layer on a CPU is computed in float32 while it is processed: CPU kernels
for half-precision matrix products are several times slower than float32 ones (docs/records/speed.md,
the half-precision bullet after section `speed`) and accumulate less precisely. The weights are rounded
back to the layer's own dtype before it propagates, so the next layer sees what the saved
checkpoint computes.
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture
from ..devices import release_freed_memory
from .statistics import AllInputsSeen, InputStatistics


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded."""


@dataclass
class CalibrationBatch:
    hidden: torch.Tensor  # the current layer's input hidden states [batch, seq, hidden]
    kwargs: dict  # what the model passes every decoder layer (masks, rotary embeddings ...)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _floats_as(value, dtype):
    """`value` (a tensor, or a tuple of them) with floating tensors in `dtype`, the rest as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_floats_as(v, dtype) for v in value)
    return value


def compute_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """What a layer stored in `dtype` computes in on `device` while it is processed (module docstring)."""
    return torch.float32 if dtype in HALF_DTYPES and torch.device(device).type == "cpu" else dtype


@torch.no_grad()
def capture_first_layer_inputs(model, samples: torch.Tensor, batch_size: int, device) -> list:
    """Run the embeddings only, recording exactly what the model hands its first decoder layer."""
    architecture = Architecture(model.config)
    first = architecture.decoder_layers(model)[0]
    movable = architecture.before_layers(model)
    home = next(movable[0].parameters()).device
    for module in movable:
        module.to(device)
    batches = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"}
        batches.append(CalibrationBatch(hidden.detach(), kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for module in movable:
            module.to(home)
    return batches


def layer_forward(layer, hidden: torch.Tensor, kwargs: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's output for `hidden`, computed in `dtype` (None: hidden's own, the kwargs as they are)."""
    if dtype is not None:
        hidden = hidden.to(dtype)
        kwargs = {key: _floats_as(value, dtype) for key, value in kwargs.items()}
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def layer_output(layer, batch: CalibrationBatch, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's output for `batch`, computed in `dtype` (None: the batch's own) and returned in the
    batch's dtype, so activations between layers keep the model's dtype however a layer computed."""
    hidden = batch.hidden
    return layer_forward(layer, hidden, batch.kwargs, dtype).to(hidden.dtype)


@torch.no_grad()
def walk_layers(model, batches: list, device, compress_layer, progress: bool = True, desc: str = "compressing layers",
                dense: bool = False) -> None:
    """For each layer: collect input statistics, call compress_layer(index, layer, stats), propagate.

    `batches` are the first layer's inputs; they are replaced in place by each layer's
    outputs, so memory holds one set of activations whatever the depth. `dense`: the visit only
    reads (process_layer).
    """
    architecture = Architecture(model.config)
    layers = architecture.decoder_layers(model)
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
        process_layer(index, layers[index], batches, device, compress_layer, architecture, dense)
        release_freed_memory()  # the replaced dense layer's fragments, or the heap keeps growing


@torch.no_grad()
def process_layer(index, layer, batches, device, compress_layer, architecture: Architecture, dense: bool = False) -> None:
    """One step of the walk (shared by the in-memory and the streamed walk): statistics, compression,
    propagation. Only this layer visits the compute device; `batch.hidden` becomes its output. A layer the
    step skips (its `skipped_layers`: whole layers removed) is left as it is, and its input passes on.

    `dense`: the step only reads the layer (a dense walk's scoring visit), so the outputs of the statistics
    pass are the layer's outputs and propagate from it: the layer runs once, not twice. A visitor that
    watches the layer's forward pass registers its hooks in `before(index, layer)`, called before it."""
    if index in getattr(compress_layer, "skipped_layers", ()):
        return
    first = next(layer.parameters())
    home, stored = first.device, first.dtype
    computed = compute_dtype(stored, device)
    dtype = computed if computed != stored else None
    layer.to(device, computed)
    if hasattr(compress_layer, "before"):
        compress_layer.before(index, layer)
    stats = InputStatistics(architecture.input_modules(layer), getattr(compress_layer, "gram_sources", ()))
    # A compressing step propagates from the compressed layer, so this pass's outputs are not needed unless
    # a visitor watches the layer's forward pass (`before`).
    inputs_only = not dense and not hasattr(compress_layer, "before")
    with stats.recording(stop_when_all_seen=inputs_only):
        for batch in batches:
            try:
                output = layer_output(layer, batch, dtype)
            except AllInputsSeen:
                continue
            if dense:
                batch.hidden = output
    stats.check_finite(index)
    compress_layer(index, layer, stats)
    if not dense:
        if dtype is not None:  # propagate with the weights as they will be saved
            layer.to(dtype=stored).to(dtype=computed)
        for batch in batches:
            batch.hidden = layer_output(layer, batch, dtype)
    layer.to(home, stored)
