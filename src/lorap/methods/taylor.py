"""LLM-Pruner's first-order Taylor importance of FFN channels, from calibration gradients.

Needs one backward pass per calibration batch through the whole model, so the whole model must
be in memory (the reason LLM-Pruner needs 80 GB for LLaMA-7B); only the FFN weights get
gradients. Channel c of layer l scores sum |w * dL/dw| over row c of gate and up and column c
of down, with dL/dw accumulated over all calibration batches (the language-modelling loss).
"""
import torch
from tqdm.auto import tqdm

from ..architectures import FFN_PROJECTIONS, Architecture


def _salience(weight) -> torch.Tensor:
    """|w * dL/dw| per weight, in float32."""
    return (weight.detach().float() * weight.grad.float()).abs()


def taylor_channel_scores(model, samples: torch.Tensor, batch_size: int, device, progress: bool = True) -> list:
    """[scores of layer 0's channels, ...] for the model as it is (dense)."""
    architecture = Architecture(model.config)
    layers = architecture.decoder_layers(model)
    home = next(model.parameters()).device
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    # The physical weights holding the FFN projections (one fused weight may hold two).
    holders = (architecture.holder(layer, name)[0] for layer in layers for name in FFN_PROJECTIONS)
    weights = {id(module.weight): module.weight for module in holders}
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
        scores = []
        for layer in layers:
            gate, up, down = (architecture.projection_weight(layer, name, _salience) for name in FFN_PROJECTIONS)
            scores.append((gate.sum(1) + up.sum(1) + down.sum(0)).cpu())
        return scores
    finally:
        for weight in weights.values():
            weight.grad = None
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.to(home)


def prepare_taylor_scores(run) -> None:
    """The registered whole-model pass of the Taylor criterion: per-layer scores before the walk."""
    if "ffn" in run.config.sublayers:
        run.channel_scores = taylor_channel_scores(run.model, run.samples, run.config.batch_size, run.device, run.progress)
