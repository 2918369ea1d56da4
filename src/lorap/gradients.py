"""LLM-Pruner's first-order Taylor importance of FFN channels, from calibration gradients.

Needs one backward pass per calibration batch through the whole model, so the whole model must
be in memory (the reason LLM-Pruner needs 80 GB for LLaMA-7B); only the FFN weights get
gradients. Channel c of layer l scores sum |w * dL/dw| over row c of gate and up and column c
of down, with dL/dw accumulated over all calibration batches (the language-modelling loss).
"""
import torch
from tqdm.auto import tqdm

from .architectures import decoder_layers, ffn_module

FFN_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _salience(weight) -> torch.Tensor:
    """|w * dL/dw| per weight, in float32."""
    return (weight.detach().float() * weight.grad.float()).abs()


def taylor_channel_scores(model, samples: torch.Tensor, batch_size: int, device, progress: bool = True) -> list:
    """[scores of layer 0's channels, ...] for the model as it is (dense)."""
    home = next(model.parameters()).device
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    weights = [[getattr(ffn_module(layer), name).weight for name in FFN_WEIGHTS] for layer in decoder_layers(model)]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer_weights in weights:
        for weight in layer_weights:
            weight.requires_grad_(True)
            weight.grad = None
    model.to(device)
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, samples.shape[0], batch_size), desc="taylor gradients", unit="batch",
                              disable=not progress):
                batch = samples[start : start + batch_size].to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return [(_salience(gate).sum(1) + _salience(up).sum(1) + _salience(down).sum(0)).cpu() for gate, up, down in weights]
    finally:
        for layer_weights in weights:
            for weight in layer_weights:
                weight.grad = None
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.to(home)
