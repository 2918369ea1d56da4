"""Model classes for LoRAP-compressed checkpoints.

This file is copied into every checkpoint lorap writes and is referenced from its
config.json `auto_map`, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
works where lorap is not installed. It must therefore import nothing from lorap.

The compressed shapes are recorded in `config.lorap["layers"]`: for each decoder layer, the
rank of each attention projection (null when it stayed dense), the FFN width kept, and
`down_proj_bias: true` where the down projection gained a bias (compensated channels).
"""
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LowRankLinear(nn.Module):
    """x -> left(right(x)): a rank-`rank` factorization of a linear layer.

    The two factors are plain nn.Linear layers so that LoRA (PEFT) can attach to them and be
    merged back without ever rebuilding the dense matrix. A bias of the original layer stays
    on the outer factor.
    """

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.right = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.left = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def shaped_like(cls, linear, rank):
        """An (uninitialised) factor pair with the shapes, bias, device and dtype of `linear`."""
        return cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def forward(self, x):
        return self.left(self.right(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _like(linear, in_features, out_features, bias=False):
    return nn.Linear(
        in_features,
        out_features,
        bias=bias or linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def apply_layout(model, layers_layout):
    """Give a freshly built dense model the shapes of a compressed one (weights are loaded after)."""
    decoder_layers = model.model.layers
    if len(layers_layout) != len(decoder_layers):
        raise ValueError(f"layout has {len(layers_layout)} layers, model has {len(decoder_layers)}")
    for layer, layout in zip(decoder_layers, layers_layout):
        attention = layer.self_attn
        for name in ATTENTION_PROJECTIONS:
            rank = layout.get(name)
            if rank is None:
                continue
            setattr(attention, name, LowRankLinear.shaped_like(getattr(attention, name), rank))
        mlp = layer.mlp
        width = layout.get("intermediate_size") or mlp.gate_proj.out_features
        down_bias = bool(layout.get("down_proj_bias"))  # gained by compensating removed channels
        if width != mlp.gate_proj.out_features or (down_bias and mlp.down_proj.bias is None):
            hidden = mlp.gate_proj.in_features
            mlp.gate_proj = _like(mlp.gate_proj, hidden, width)
            mlp.up_proj = _like(mlp.up_proj, hidden, width)
            mlp.down_proj = _like(mlp.down_proj, width, hidden, bias=down_bias)
            mlp.intermediate_size = width


class _LorapMixin:
    """Builds the base architecture, then narrows it to the recorded compressed shapes."""

    def __init__(self, config):
        super().__init__(config)
        lorap = getattr(config, "lorap", None)
        if lorap is not None:
            apply_layout(self, lorap["layers"])


class LorapLlamaForCausalLM(_LorapMixin, LlamaForCausalLM):
    pass


class LorapMistralForCausalLM(_LorapMixin, MistralForCausalLM):
    pass


class LorapQwen2ForCausalLM(_LorapMixin, Qwen2ForCausalLM):
    pass
