"""Model classes for SliceGPT-sliced checkpoints (Ashkboos et al. 2024, arXiv 2401.15024).

This file is copied into every sliced checkpoint and named in its config.json `auto_map`, so
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` rebuilds the sliced shapes where
lorap is not installed. It imports nothing but torch and transformers.

What a sliced model is. Each RMSNorm's weight was multiplied into the linears that read its output,
leaving norms without weights; the residual stream of each block was then rotated into the PCA basis
of that block's input and cut to its leading directions. So, for the stream widths recorded in
`config.slicegpt` (the layout, below):

* the token embedding has `embedding_dim` columns;
* decoder layer i reads a stream of `attention_in` dims (q/k/v read that many), writes the stream
  after attention in `mlp_in` dims (o_proj's rows; gate/up read that many) and its output in `out`
  dims (down_proj's rows; the next layer's `attention_in`);
* the residual path of each block crosses from one basis to the next through a matrix without bias:
  `attn_shortcut` (attention_in -> mlp_in) and `mlp_shortcut` (mlp_in -> out); so a layer computes
  h = attn_shortcut(x) + attention(norm(x)); y = mlp_shortcut(h) + mlp(norm(h));
* every norm is weightless and divides the sum of squares of the dims it sees by the *dense* hidden
  size (`hidden_size`): the sliced-away directions are the ones that carried the least of it, and with
  nothing sliced this is the dense RMSNorm exactly (as the reference implementation does);
* `head` "untied": lm_head has its own weight, vocab x (the last layer's `out`); "tied": lm_head shares
  the embedding (vocab x embedding_dim) and the final norm ends with `head_in`, a linear from the last
  layer's `out` dims to `embedding_dim` that maps the final basis into the embedding's.

Attention (GQA, RoPE, the KV cache) is the family's own module, unchanged: heads live between
q/k/v and o_proj, where nothing was sliced. config.hidden_size stays the dense width.
"""
import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

LAYOUT_KEY = "slicegpt"  # config.slicegpt holds the layout
LAYOUT_FORMAT = 1


class WeightlessRMSNorm(nn.Module):
    """x / sqrt(sum(x^2) / mean_dim + eps) over the `width` dims it sees, with no weight.

    `mean_dim` is the dense hidden size: with width == mean_dim this is an RMSNorm whose weight was
    folded into the linears after it."""

    def __init__(self, width: int, mean_dim: int, eps: float):
        super().__init__()
        self.width, self.mean_dim, self.eps = width, mean_dim, eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        if dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (hidden_states * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self):
        return f"width={self.width}, mean_dim={self.mean_dim}, eps={self.eps}"


class ProjectedRMSNorm(WeightlessRMSNorm):
    """The final norm of a model whose LM head stays tied to the embedding: the weightless norm, then
    `head_in` from the final basis into the embedding's (it carries the dense final norm's weight)."""

    def __init__(self, width: int, mean_dim: int, eps: float, head_width: int, device=None, dtype=None):
        super().__init__(width, mean_dim, eps)
        self.head_in = nn.Linear(width, head_width, bias=False, device=device, dtype=dtype)

    def forward(self, hidden_states):
        normed = super().forward(hidden_states)
        return self.head_in(normed.to(self.head_in.weight.dtype))


class _SlicedDecoderLayer:
    """The decoder layer's forward with each residual path through its shortcut matrix; the attention,
    the MLP and the keyword arguments the model hands its layers are the family's own."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        cache_position=None,
        position_embeddings=None,
        **kwargs,
    ):
        if "past_key_value" in kwargs:  # the name before transformers 4.56
            past_key_values = kwargs.pop("past_key_value")
        attended = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            cache_position=cache_position,
            position_embeddings=position_embeddings,
            **kwargs,
        )[0]
        hidden_states = self.attn_shortcut(hidden_states) + attended
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


class SlicedLlamaDecoderLayer(_SlicedDecoderLayer, LlamaDecoderLayer):
    pass


class SlicedMistralDecoderLayer(_SlicedDecoderLayer, MistralDecoderLayer):
    pass


class SlicedQwen2DecoderLayer(_SlicedDecoderLayer, Qwen2DecoderLayer):
    pass


DECODER_LAYERS = {"llama": SlicedLlamaDecoderLayer, "mistral": SlicedMistralDecoderLayer, "qwen2": SlicedQwen2DecoderLayer}


def _linear(in_features, out_features, bias, like):
    return nn.Linear(in_features, out_features, bias=bias, device=like.device, dtype=like.dtype)


def final_width(layout: dict) -> int:
    return layout["layers"][-1]["out"] if layout["layers"] else layout["embedding_dim"]


def check_layout(layout: dict, num_layers: int) -> None:
    """Refuse a layout this file cannot rebuild (another format, widths that do not chain up)."""
    if layout.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"config.{LAYOUT_KEY} has format {layout.get('format')!r}; this file reads format {LAYOUT_FORMAT}")
    if len(layout["layers"]) != num_layers:
        raise ValueError(f"config.{LAYOUT_KEY} describes {len(layout['layers'])} layers, the model has {num_layers}")
    width = layout["embedding_dim"]
    for index, dims in enumerate(layout["layers"]):
        if dims["attention_in"] != width:
            raise ValueError(f"config.{LAYOUT_KEY}: layer {index} reads {dims['attention_in']} dims, the stream has {width}")
        width = dims["out"]
    if layout["head"] not in ("tied", "untied"):
        raise ValueError(f"config.{LAYOUT_KEY}: head is {layout['head']!r}, not 'tied' or 'untied'")


def set_sliced_layer(layer, dims: dict, layout: dict, model_type: str) -> None:
    """Give a dense decoder layer the shapes of sliced layer `dims` (weights uninitialised) and the
    sliced forward. Attention heads and the FFN width stay as they are."""
    a_in, m_in, out = dims["attention_in"], dims["mlp_in"], dims["out"]
    attention, mlp = layer.self_attn, layer.mlp
    like = attention.q_proj.weight
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attention, name)
        setattr(attention, name, _linear(a_in, old.out_features, old.bias is not None, like))
    attention.o_proj = _linear(attention.o_proj.in_features, m_in, attention.o_proj.bias is not None, like)
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        setattr(mlp, name, _linear(m_in, old.out_features, old.bias is not None, like))
    mlp.down_proj = _linear(mlp.down_proj.in_features, out, mlp.down_proj.bias is not None, like)
    set_sliced_norms_and_shortcuts(layer, dims, layout, model_type, like)


def set_sliced_norms_and_shortcuts(layer, dims: dict, layout: dict, model_type: str, like) -> None:
    """The weightless norms, the two shortcut matrices (uninitialised) and the sliced forward."""
    a_in, m_in, out = dims["attention_in"], dims["mlp_in"], dims["out"]
    d, eps = layout["hidden_size"], layout["rms_norm_eps"]
    layer.input_layernorm = WeightlessRMSNorm(a_in, d, eps)
    layer.post_attention_layernorm = WeightlessRMSNorm(m_in, d, eps)
    layer.attn_shortcut = _linear(a_in, m_in, False, like)
    layer.mlp_shortcut = _linear(m_in, out, False, like)
    layer.__class__ = DECODER_LAYERS[model_type]


def set_sliced_ends(model, layout: dict, like) -> None:
    """The sliced embedding, final norm and LM head (weights uninitialised; a tied head shares the
    embedding's weight)."""
    inner = model.model
    old = inner.embed_tokens
    inner.embed_tokens = nn.Embedding(old.num_embeddings, layout["embedding_dim"], padding_idx=old.padding_idx,
                                      device=like.device, dtype=like.dtype)
    width, d, eps = final_width(layout), layout["hidden_size"], layout["rms_norm_eps"]
    vocab = model.lm_head.out_features
    if layout["head"] == "tied":
        inner.norm = ProjectedRMSNorm(width, d, eps, layout["embedding_dim"], like.device, like.dtype)
        model.lm_head = _linear(layout["embedding_dim"], vocab, False, like)
        model.lm_head.weight = inner.embed_tokens.weight
    else:
        inner.norm = WeightlessRMSNorm(width, d, eps)
        model.lm_head = _linear(width, vocab, model.lm_head.bias is not None, like)


def apply_layout(model, layout: dict) -> None:
    """Turn a freshly built dense model into the sliced shapes of `layout` (weights uninitialised)."""
    model_type = model.config.model_type
    if model_type not in DECODER_LAYERS:
        raise ValueError(f"sliced checkpoints of model type {model_type!r} are not supported")
    layers = model.model.layers
    check_layout(layout, len(layers))
    like = model.model.embed_tokens.weight
    for layer, dims in zip(layers, layout["layers"]):
        set_sliced_layer(layer, dims, layout, model_type)
    set_sliced_ends(model, layout, like)


class _SlicedMixin:
    _no_split_modules = [cls.__name__ for cls in DECODER_LAYERS.values()]

    def __init__(self, config):
        super().__init__(config)
        layout = getattr(config, LAYOUT_KEY, None)
        if layout is None:
            raise ValueError(f"config has no '{LAYOUT_KEY}' layout: not a SliceGPT checkpoint")
        apply_layout(self, layout)
        self.post_init()


class SlicedLlamaForCausalLM(_SlicedMixin, LlamaForCausalLM):
    pass


class SlicedMistralForCausalLM(_SlicedMixin, MistralForCausalLM):
    pass


class SlicedQwen2ForCausalLM(_SlicedMixin, Qwen2ForCausalLM):
    pass


SLICED_CLASSES = {"llama": SlicedLlamaForCausalLM, "mistral": SlicedMistralForCausalLM, "qwen2": SlicedQwen2ForCausalLM}
