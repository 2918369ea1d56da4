"""LLM-Pruner's first-order Taylor importance of FFN channels and attention heads, from calibration gradients.

Channel c of layer l scores sum |w * dL/dw| over row c of gate and up and column c of down, with
dL/dw accumulated over all calibration batches (the language-modelling loss). With head pruning, a
query channel scores the same sum over its row of q and column of o, plus an even share of the k
and v rows it reads (head_pruning.py), and a KV group the sum over its channels. Only the weights
scored get gradients.

In memory, one backward pass per batch through the whole model (what LLM-Pruner does, and why it
needs 80 GB for LLaMA-7B). Streamed, the same gradients layer by layer, one layer in memory at a
time: a forward walk saves each layer's input to the staging folder, the loss at the head gives
the gradient of the last hidden states, and a backward walk (last layer first) recomputes each
layer from its saved input and back-propagates that gradient through it, which yields its FFN
weight gradients and the gradient of its input for the layer below.
"""
import torch
from tqdm.auto import tqdm

from ..architectures import Architecture
from ..families import ATTENTION_PROJECTIONS, FFN_PROJECTIONS
from ..pipeline.walk import compute_dtype, layer_forward, layer_output
from .head_pruning import HeadLayout, per_query_channel

# What is scored -> the logical projections whose weights need gradients
SCORED = {"ffn": FFN_PROJECTIONS, "heads": ATTENTION_PROJECTIONS}
TAYLOR = "llm-pruner-taylor"  # the criterion's registered name, for FFN channels and heads alike


def _salience(weight) -> torch.Tensor:
    """|w * dL/dw| per weight, in float32."""
    return (weight.detach().float() * weight.grad.float()).abs()


def _scored_weights(architecture, layers, scored: tuple) -> dict:
    """{id: weight} of the physical weights holding the scored projections (one fused weight may hold several)."""
    holders = (architecture.holder(layer, name)[0] for layer in layers for part in scored for name in SCORED[part])
    return {id(module.weight): module.weight for module in holders}


def taylor_channel_scores(model, samples: torch.Tensor, batch_size: int, device, progress: bool = True,
                          scored: tuple = ("ffn",), layout: HeadLayout | None = None) -> list:
    """[{part: scores of layer 0's FFN channels ("ffn") or query channels ("heads")}, ...] for the model
    as it is (dense); `layout` describes the heads where they are scored."""
    architecture = Architecture(model.config)
    layers = architecture.decoder_layers(model)
    home = next(model.parameters()).device
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    weights = _scored_weights(architecture, layers, scored)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
        weight.grad = None
    model.to(device)
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, samples.shape[0], batch_size), desc="taylor gradients", unit="batch",
                              disable=not progress):
                batch = samples[start : start + batch_size].to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return [_layer_salience(architecture, layer, scored, layout) for layer in layers]
    finally:
        for weight in weights.values():
            weight.grad = None
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.to(home)


def _layer_salience(architecture, layer, scored: tuple, layout: HeadLayout | None) -> dict:
    salience = {}
    if "ffn" in scored:
        gate, up, down = (architecture.projection_weight(layer, name, _salience) for name in FFN_PROJECTIONS)
        salience["ffn"] = (gate.sum(1) + up.sum(1) + down.sum(0)).cpu()
    if "heads" in scored:
        q, k, v, o = (architecture.projection_weight(layer, name, _salience) for name in ATTENTION_PROJECTIONS)
        salience["heads"] = per_query_channel(q.sum(1), k.sum(1), v.sum(1), o.sum(0), layout).cpu()
    return salience


def layerwise_taylor_scores(source, samples: torch.Tensor, batch_size: int, device, progress: bool = True,
                            scored: tuple = ("ffn",), layout: HeadLayout | None = None) -> list:
    """The same scores as taylor_channel_scores, with one decoder layer in memory at a time.

    `source` is a streamed layer source (pipeline/sharded.py): first_layer_inputs, dense_layer,
    loss_head and a staging folder for the saved layer inputs.
    """
    from ..pipeline.activations import ActivationStore
    from ..devices import release_freed_memory

    architecture, n_layers = source.architecture, source.n_layers
    scratch = source.staging / "taylor"
    scratch.mkdir(exist_ok=True)
    store, batches = source.first_layer_inputs(samples, batch_size, device, None)
    try:
        for index in tqdm(range(n_layers), desc="taylor forward (streamed)", unit="layer", disable=not progress):
            store.save(scratch / f"input-{index}")
            with source.dense_layer(index) as layer:
                computed = compute_dtype(next(layer.parameters()).dtype, device)
                layer.to(device, computed)
                with torch.no_grad():
                    for batch in batches:
                        batch.hidden = layer_output(layer, batch, computed)
        gradients = ActivationStore(store.shape, torch.float32)
        with source.loss_head(device) as loss_of:
            for batch in batches:
                hidden = batch.hidden.detach().to(loss_of.dtype).requires_grad_(True)
                with torch.enable_grad():
                    loss_of(hidden, samples[batch.rows].to(device)).backward()
                gradients.data[batch.rows] = hidden.grad.float().cpu()
        scores = [None] * n_layers
        for index in tqdm(reversed(range(n_layers)), total=n_layers, desc="taylor backward (streamed)", unit="layer",
                          disable=not progress):
            store.load(scratch / f"input-{index}")
            with source.dense_layer(index) as layer:
                computed = compute_dtype(next(layer.parameters()).dtype, device)
                layer.to(device, computed)
                for parameter in layer.parameters():
                    parameter.requires_grad_(False)
                for weight in _scored_weights(architecture, [layer], scored).values():
                    weight.requires_grad_(True)
                for batch in batches:
                    hidden = batch.hidden.detach().to(computed).requires_grad_(True)
                    with torch.enable_grad():
                        output = layer_forward(layer, hidden, batch.kwargs, computed)
                    output.backward(gradients.data[batch.rows].to(device, output.dtype))
                    gradients.data[batch.rows] = hidden.grad.float().cpu()
                scores[index] = _layer_salience(architecture, layer, scored, layout)
            (scratch / f"input-{index}").unlink()
        return scores
    finally:
        for file in scratch.glob("input-*"):
            file.unlink()
        scratch.rmdir()
        release_freed_memory()


def prepare_taylor_scores(run) -> None:
    """The registered whole-model pass of the Taylor criterion, for FFN channels, heads, or both in one
    pass: per-layer scores before the walk (in memory through the whole model, streamed layer by layer)."""
    config, plan = run.config, run.plan
    scored = tuple(part for part, wanted in (
        ("ffn", config.ffn_score == TAYLOR and "ffn" in config.sublayers and run.channel_scores is None),
        ("heads", config.head_score == TAYLOR and config.attention == "heads" and "attention" in config.sublayers
         and run.head_scores is None),
    ) if wanted)
    if not scored:
        return  # nothing to score, or scored already by the other part's pass
    layout = HeadLayout.of(plan)
    if run.model is not None:
        scores = taylor_channel_scores(run.model, run.samples, config.batch_size, run.device, run.progress, scored, layout)
    else:
        scores = layerwise_taylor_scores(run.source, run.samples, config.batch_size, run.device, run.progress, scored,
                                         layout)
    if "ffn" in scored:
        run.channel_scores = [layer["ffn"] for layer in scores]
    if "heads" in scored:
        run.head_scores = [layer["heads"] for layer in scores]
