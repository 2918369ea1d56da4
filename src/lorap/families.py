"""The supported model families as data, and the shapes a config implies: pure functions of a
config, no torch, so that plans, the CLI and `lorap plan` work from a config.json alone.

Everything else in lorap speaks of seven *logical* projections of a decoder layer: q_proj, k_proj,
v_proj, o_proj (attention) and gate_proj, up_proj, down_proj (the gated FFN). A family maps each to
the module that holds it: its own linear (LLaMA: `self_attn.q_proj`), or a row block of a fused one
(Phi-3: q, k and v are the rows of `self_attn.qkv_proj`; gate and up the two halves of
`mlp.gate_up_proj`). The family also says which modules turn token ids into the first layer's input,
how many norms each layer has, and under which state-dict prefix the layers are saved.

Adding a family is one `Family` entry here, one class line in modeling_lorap.py, and tiny test
models (docs/architecture.md has the checklist). architectures.py binds a family to a loaded model.
"""
from dataclasses import dataclass, field

from .errors import LorapError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + FFN_PROJECTIONS
# Which projection's input hook records the input that several projections share: q/k/v read the
# normed hidden state, gate/up the other normed hidden state. The keys name the *input sources*.
SHARED_INPUTS = {
    "q_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def _separate(attention: str = "self_attn", ffn: str = "mlp") -> dict:
    return {**{n: f"{attention}.{n}" for n in ATTENTION_PROJECTIONS}, **{n: f"{ffn}.{n}" for n in FFN_PROJECTIONS}}


@dataclass(frozen=True)
class Family:
    """A model family as a table entry: names and paths, no code."""

    model_type: str
    base_class: str  # the transformers class of the dense model
    lorap_class: str  # its subclass in modeling_lorap.py that rebuilds compressed shapes
    qkv_bias: bool = False  # q/k/v carry a bias regardless of config.attention_bias
    layers: str = "model.layers"  # the list of decoder layers, from the model
    # What the model runs before its first decoder layer (moved to the compute device to capture
    # that layer's inputs); the first is the token embedding.
    before_layers: tuple = ("model.embed_tokens", "model.rotary_emb")
    # logical projection -> module path inside a decoder layer
    projections: dict = field(default_factory=_separate)
    # a fused module -> the logical projections stacked in its rows, in order
    fused: dict = field(default_factory=dict)
    norms_per_layer: int = 2  # RMSNorms in each decoder layer (weights of `hidden_size`)
    ffn_module: str = "mlp"  # the FFN module (its `intermediate_size` attribute follows pruning)


# LLaMA-family decoders: model.layers[i].self_attn.{q,k,v,o}_proj and .mlp.{gate,up,down}_proj.
FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "LorapLlamaForCausalLM"),
        Family("mistral", "MistralForCausalLM", "LorapMistralForCausalLM"),
        Family("qwen2", "Qwen2ForCausalLM", "LorapQwen2ForCausalLM", qkv_bias=True),
        # Gemma 1: head_dim set apart from hidden/heads, embeddings scaled inside the model's forward
        # (so the captured first-layer input already carries the scale), GeLU-gated FFN.
        Family("gemma", "GemmaForCausalLM", "LorapGemmaForCausalLM"),
        # Phi-3: q, k, v fused in qkv_proj; gate and up fused in gate_up_proj (gate first).
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "LorapPhi3ForCausalLM",
            projections={
                **{n: "self_attn.qkv_proj" for n in ("q_proj", "k_proj", "v_proj")},
                "o_proj": "self_attn.o_proj",
                "gate_proj": "mlp.gate_up_proj",
                "up_proj": "mlp.gate_up_proj",
                "down_proj": "mlp.down_proj",
            },
            fused={"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")},
        ),
    )
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise LorapError(
            f"model type '{model_type}' is not supported; lorap supports "
            f"{', '.join(sorted(FAMILIES))} (LLaMA 1/2/3, Mistral, Qwen2/2.5, Gemma, Phi-3, SmolLM, TinyLlama ...)"
        )
    if getattr(config, "hidden_act", None) is None and getattr(config, "hidden_activation", None) is None:
        raise LorapError(f"model type '{model_type}' has no gated FFN activation; LoRAP needs a gated FFN")
    return FAMILIES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_shapes(config) -> dict:
    """{projection: (out_features, in_features, bias)} for one decoder layer."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hd = head_dim(config)
    qkv_bias = family_of(config).qkv_bias or bool(getattr(config, "attention_bias", False))
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


def other_parameters(config) -> int:
    """Parameters outside the seven projections: embeddings, norms, LM head (never compressed)."""
    d, vocab, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    embeddings = vocab * d
    head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * d
    norms = (family_of(config).norms_per_layer * n_layers + 1) * d  # each layer's and the final one
    return embeddings + head + norms


# Config entries holding one value per decoder layer (Qwen2's sliding or full attention per layer)
PER_LAYER_CONFIG_LISTS = ("layer_types",)


def keep_layers(config, kept: list) -> None:
    """Make `config` (in place) describe only the decoder layers `kept` (dense indices, in order): the
    layer count, and each per-layer list cut to those layers."""
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if values is not None:
            setattr(config, name, [values[index] for index in kept])
    config.num_hidden_layers = len(kept)
