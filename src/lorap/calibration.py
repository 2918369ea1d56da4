"""The sequential layer walk and the input statistics it collects.

Layers are visited in order. Layer i is calibrated on the outputs of layers 0..i-1 *after*
they were compressed, so each layer's compression sees (and can absorb) the error of the
layers before it. Only the layer being processed is on the compute device.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .architectures import attention_module, decoder_layers, ffn_module
from .errors import LorapError

# Which linear's input hook serves which projections: q/k/v share the normed hidden state,
# gate/up share the other normed hidden state.
SHARED_INPUTS = {
    "q_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


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
    first = decoder_layers(model)[0]
    inner = model.model
    movable = [inner.embed_tokens] + ([inner.rotary_emb] if hasattr(inner, "rotary_emb") else [])
    home = next(inner.embed_tokens.parameters()).device
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


class InputStatistics:
    """Per-channel sums of squares of the inputs of the seven projections of one layer.

    statistic(name) = sqrt(sum over calibration tokens of x_j^2 / n_sequences), accumulated
    in float64 so long calibration runs never overflow or lose precision.
    """

    def __init__(self, layer):
        attention, mlp = attention_module(layer), ffn_module(layer)
        self._modules = {
            "q_proj": attention.q_proj,
            "o_proj": attention.o_proj,
            "gate_proj": mlp.gate_proj,
            "down_proj": mlp.down_proj,
        }
        self.sum_squares: dict = {}
        self.sequences = 0
        self._handles = []

    @contextmanager
    def recording(self):
        def hook_for(name):
            def hook(module, args):
                x = args[0].detach()
                squares = x.float().pow(2).sum(dim=tuple(range(x.dim() - 1))).double()
                if name in self.sum_squares:
                    self.sum_squares[name] += squares
                else:
                    self.sum_squares[name] = squares
                if name == "q_proj":
                    self.sequences += x.shape[0] if x.dim() == 3 else 1

            return hook

        self._handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in self._modules.items()]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()

    def check_finite(self, layer_index: int) -> None:
        for name, squares in self.sum_squares.items():
            if not torch.isfinite(squares).all():
                raise LorapError(
                    f"non-finite activations (NaN or Inf) at the input of layer {layer_index} {name}; "
                    "the model or its dtype overflows on the calibration data (try --dtype float32)"
                )

    def statistic(self, projection: str) -> torch.Tensor:
        for source, served in SHARED_INPUTS.items():
            if projection in served:
                return (self.sum_squares[source] / max(self.sequences, 1)).sqrt().float()
        raise KeyError(projection)


def layer_output(layer, batch: CalibrationBatch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def walk_layers(model, batches: list, device, compress_layer, progress: bool = True) -> None:
    """For each layer: collect input statistics, call compress_layer(index, layer, stats), propagate.

    `batches` are the first layer's inputs; they are replaced in place by each layer's
    outputs, so memory holds one set of activations whatever the depth.
    """
    layers = decoder_layers(model)
    for index in tqdm(range(len(layers)), desc="compressing layers", unit="layer", disable=not progress):
        process_layer(index, layers[index], batches, device, compress_layer)


@torch.no_grad()
def process_layer(index, layer, batches, device, compress_layer) -> None:
    """One step of the walk (shared by the in-memory and the streamed walk): statistics, compression,
    propagation. Only this layer visits the compute device; `batch.hidden` becomes its output."""
    home = next(layer.parameters()).device
    layer.to(device)
    stats = InputStatistics(layer)
    with stats.recording():
        for batch in batches:
            layer_output(layer, batch)
    stats.check_finite(index)
    compress_layer(index, layer, stats)
    for batch in batches:
        batch.hidden = layer_output(layer, batch)
    layer.to(home)
