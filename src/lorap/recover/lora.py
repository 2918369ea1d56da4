"""LoRA on a compressed model: its targets (every decoder linear, dense and factors), attaching
it, and reading or restoring the trainable (adapter) weights."""
from ..errors import LorapError
from .config import RecoveryConfig


def lora_target_names(model) -> list:
    """Full names of every nn.Linear inside the decoder layers: dense projections and both
    factors of each LowRankLinear (PEFT can only wrap the Linear leaves, not the pair)."""
    from torch import nn

    from ..architectures import Architecture

    names = {id(module): name for name, module in model.named_modules()}
    targets = []
    for layer in Architecture(model.config).decoder_layers(model):
        targets += [names[id(module)] for module in layer.modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise LorapError("the model has no linear layers in its decoder layers to attach LoRA to")
    return targets


def attach_lora(model, config: RecoveryConfig):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from the global RNG
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_names(model),
        bias="none",
    )
    return get_peft_model(model, lora)


def trainable_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise LorapError("the saved adapter does not match this model's LoRA layers; was the run started differently?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
