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


@dataclass
class ProjectionInputs:
    """What the calibration tokens looked like at one projection's input, per input channel.

    `norm` is the paper's statistic sqrt(sum x_j^2 / n_sequences); the others serve the
    baselines (ASVD: mean |x|; FLAP: mean and variance; SVD-LLM whitening and least-squares
    FFN updates: the Gram matrix sum x x^T, only collected when a method asks for it).
    """

    norm: torch.Tensor
    mean: torch.Tensor | None = None
    mean_abs: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    gram: torch.Tensor | None = None  # float64 [in, in], sum over tokens of x x^T
    tokens: int = 0

    @classmethod
    def from_norm(cls, norm: torch.Tensor) -> "ProjectionInputs":
        return cls(norm=norm)


class InputStatistics:
    """Per-channel sums over the calibration tokens at the inputs of the seven projections of one layer.

    Accumulated in float64 so long calibration runs never overflow or lose precision. Gram
    matrices (in x in) are collected only for the input sources named in `gram_sources`
    (q_proj, o_proj, gate_proj, down_proj), as they cost memory and time.
    """

    def __init__(self, layer, gram_sources=()):
        attention, mlp = attention_module(layer), ffn_module(layer)
        self._modules = {
            "q_proj": attention.q_proj,
            "o_proj": attention.o_proj,
            "gate_proj": mlp.gate_proj,
            "down_proj": mlp.down_proj,
        }
        unknown = set(gram_sources) - set(self._modules)
        if unknown:
            raise ValueError(f"no input source named {sorted(unknown)}")
        self.gram_sources = set(gram_sources)
        self.sum_squares: dict = {}
        self.sums: dict = {}
        self.sum_abs: dict = {}
        self.grams: dict = {}
        self.tokens: dict = {}
        self.sequences = 0
        self._handles = []

    @staticmethod
    def _add(table: dict, name: str, value: torch.Tensor) -> None:
        if name in table:
            table[name] += value
        else:
            table[name] = value

    @contextmanager
    def recording(self):
        def hook_for(name):
            def hook(module, args):
                x = args[0].detach()
                flat = x.reshape(-1, x.shape[-1]).float()
                self._add(self.sum_squares, name, flat.pow(2).sum(0).double())
                self._add(self.sums, name, flat.sum(0).double())
                self._add(self.sum_abs, name, flat.abs().sum(0).double())
                self.tokens[name] = self.tokens.get(name, 0) + flat.shape[0]
                if name in self.gram_sources:
                    # float32 products per batch (exact enough over ~1k tokens), float64 across batches
                    self._add(self.grams, name, (flat.T @ flat).double())
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

    @staticmethod
    def source_of(projection: str) -> str:
        for source, served in SHARED_INPUTS.items():
            if projection in served:
                return source
        raise KeyError(projection)

    def statistic(self, projection: str) -> torch.Tensor:
        """The paper's per-channel statistic s_j of this projection's input (float32)."""
        source = self.source_of(projection)
        return (self.sum_squares[source] / max(self.sequences, 1)).sqrt().float()

    def inputs(self, projection: str) -> ProjectionInputs:
        source = self.source_of(projection)
        tokens = max(self.tokens.get(source, 0), 1)
        mean = self.sums[source] / tokens
        # Sample variance over tokens, as FLAP's fluctuation; clamped against rounding below zero.
        variance = ((self.sum_squares[source] - tokens * mean.pow(2)) / max(tokens - 1, 1)).clamp_min(0)
        return ProjectionInputs(
            norm=self.statistic(projection),
            mean=mean,
            mean_abs=self.sum_abs[source] / tokens,
            variance=variance,
            gram=self.grams.get(source),
            tokens=tokens,
        )


def layer_output(layer, batch: CalibrationBatch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def walk_layers(model, batches: list, device, compress_layer, progress: bool = True, desc: str = "compressing layers") -> None:
    """For each layer: collect input statistics, call compress_layer(index, layer, stats), propagate.

    `batches` are the first layer's inputs; they are replaced in place by each layer's
    outputs, so memory holds one set of activations whatever the depth.
    """
    layers = decoder_layers(model)
    for index in tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress):
        process_layer(index, layers[index], batches, device, compress_layer)


@torch.no_grad()
def process_layer(index, layer, batches, device, compress_layer) -> None:
    """One step of the walk (shared by the in-memory and the streamed walk): statistics, compression,
    propagation. Only this layer visits the compute device; `batch.hidden` becomes its output."""
    home = next(layer.parameters()).device
    layer.to(device)
    stats = InputStatistics(layer, getattr(compress_layer, "gram_sources", ()))
    with stats.recording():
        for batch in batches:
            layer_output(layer, batch)
    stats.check_finite(index)
    compress_layer(index, layer, stats)
    for batch in batches:
        batch.hidden = layer_output(layer, batch)
    layer.to(home)
