"""The models a benchmark times: built from shapes with random weights (no checkpoint needed, so
LLaMA-7B shapes can be timed here), or a real lorap checkpoint and the base model it names.

A compressed model built from shapes has exactly the modules a checkpoint of that plan loads
into (modeling_lorap.apply_layout builds both), so its speed is the checkpoint's speed: the
values of the weights do not change how long a matmul takes.
"""
import copy

import torch

from ..architectures import Architecture
from ..errors import LorapError
from ..modeling_lorap import apply_layout, optimize_for_inference


def first_layers(config, layers: int | None):
    """The config cut to its first `layers` decoder layers (embeddings, final norm and LM head kept)."""
    total = config.num_hidden_layers
    if layers is None:
        return config
    if not isinstance(layers, int) or layers <= 0:
        raise LorapError(f"--layers must be a positive number of decoder layers, got {layers!r}")
    if layers > total:
        raise LorapError(f"--layers {layers} is more than the model's {total} decoder layers")
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = layers
    if getattr(cut, "layer_types", None):
        cut.layer_types = cut.layer_types[:layers]
    return cut


def random_model(config, dtype: torch.dtype, device, layout: list | None = None, seed: int = 0, fuse: bool = False):
    """A model of `config`'s shapes with random weights; with `layout` (Plan.layout()), narrowed to
    the compressed shapes exactly as a checkpoint of that plan is on load (and, with `fuse`, given
    the runtime lorap loads checkpoints with: modeling_lorap.optimize_for_inference)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Built where it runs: on a GPU, initialising two 7B models' random weights on the host and
    # copying them over takes minutes; on the device, seconds. (apply_layout's new modules follow
    # the weights they replace.)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        architecture = Architecture(config).record()
        if layout is not None:
            apply_layout(model, layout[: config.num_hidden_layers], architecture)
    model.eval()
    if fuse:
        optimize_for_inference(model, architecture)  # on its device: fusing binds the weights where they are
    return model
