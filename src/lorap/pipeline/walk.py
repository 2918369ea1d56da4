"""The sequential layer walk.

Layers are visited in order. Layer i is calibrated on the outputs of layers 0..i-1 *after*
they were compressed, so each layer's compression sees (and can absorb) the error of the
layers before it. Only the layer being processed is on the compute device. The in-memory and
the streamed run both go through `process_layer`, one layer at a time.
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..architectures import Architecture
from .statistics import InputStatistics


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded."""


@dataclass
class CalibrationBatch:
    hidden: torch.Tensor  # the current layer's input hidden states [batch, seq, hidden]
    kwargs: dict  # what the model passes every decoder layer (masks, rotary embeddings ...)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


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


def layer_output(layer, batch: CalibrationBatch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def walk_layers(model, batches: list, device, compress_layer, progress: bool = True, desc: str = "compressing layers") -> None:
    """For each layer: collect input statistics, call compress_layer(index, layer, stats), propagate.

    `batches` are the first layer's inputs; they are replaced in place by each layer's
    outputs, so memory holds one set of activations whatever the depth.
    """
    architecture = Architecture(model.config)
    layers = architecture.decoder_layers(model)
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
        process_layer(index, layers[index], batches, device, compress_layer, architecture)


@torch.no_grad()
def process_layer(index, layer, batches, device, compress_layer, architecture: Architecture) -> None:
    """One step of the walk (shared by the in-memory and the streamed walk): statistics, compression,
    propagation. Only this layer visits the compute device; `batch.hidden` becomes its output."""
    home = next(layer.parameters()).device
    layer.to(device)
    stats = InputStatistics(architecture.input_modules(layer), getattr(compress_layer, "gram_sources", ()))
    with stats.recording():
        for batch in batches:
            layer_output(layer, batch)
    stats.check_finite(index)
    compress_layer(index, layer, stats)
    for batch in batches:
        batch.hidden = layer_output(layer, batch)
    layer.to(home)
