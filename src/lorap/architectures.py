"""Where the seven projections live in each supported model family: a table, not if-chains."""
from dataclasses import dataclass

from .errors import LorapError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    base_class: str  # the transformers class of the dense model
    lorap_class: str  # its subclass in modeling_lorap.py that rebuilds compressed shapes
    qkv_bias: bool  # whether q/k/v carry a bias regardless of config.attention_bias


# LLaMA-family decoders that share module names (model.layers[i].self_attn.{q,k,v,o}_proj,
# .mlp.{gate,up,down}_proj) and a gated FFN.
ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", "LorapLlamaForCausalLM", qkv_bias=False),
    "mistral": Architecture("mistral", "MistralForCausalLM", "LorapMistralForCausalLM", qkv_bias=False),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", "LorapQwen2ForCausalLM", qkv_bias=True),
}


def architecture_of(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise LorapError(
            f"model type '{model_type}' is not supported; lorap supports "
            f"{', '.join(sorted(ARCHITECTURES))} (LLaMA 1/2/3, Mistral, Qwen2/2.5, SmolLM, TinyLlama ...)"
        )
    hidden_act = getattr(config, "hidden_act", None)
    if hidden_act is None:
        raise LorapError(f"model type '{model_type}' has no gated FFN activation; LoRAP needs a gated FFN")
    return ARCHITECTURES[model_type]


def decoder_layers(model):
    return model.model.layers


def attention_module(layer):
    return layer.self_attn


def ffn_module(layer):
    mlp = layer.mlp
    if not all(hasattr(mlp, name) for name in FFN_PROJECTIONS):
        raise LorapError("the FFN is not gated (no gate_proj/up_proj/down_proj); LoRAP prunes gated FFNs only")
    return mlp


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def has_qkv_bias(config) -> bool:
    return architecture_of(config).qkv_bias or bool(getattr(config, "attention_bias", False))


def attention_shapes(config) -> dict:
    """{projection: (out_features, in_features, bias)} for one decoder layer."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hd = head_dim(config)
    qkv_bias = has_qkv_bias(config)
    o_bias = bool(getattr(config, "attention_bias", False))
    return {
        "q_proj": (heads * hd, d, qkv_bias),
        "k_proj": (kv_heads * hd, d, qkv_bias),
        "v_proj": (kv_heads * hd, d, qkv_bias),
        "o_proj": (d, heads * hd, o_bias),
    }


def ffn_shapes(config, width: int | None = None) -> dict:
    d = config.hidden_size
    m = config.intermediate_size if width is None else width
    bias = bool(getattr(config, "mlp_bias", False))
    return {"gate_proj": (m, d, bias), "up_proj": (m, d, bias), "down_proj": (d, m, bias)}
