"""One adapter per model family: where the decoder layers and their projections live.

Everything else in lorap speaks of seven *logical* projections of a decoder layer: q_proj, k_proj,
v_proj, o_proj (attention) and gate_proj, up_proj, down_proj (the gated FFN). A family maps each to
the module that holds it: its own linear (LLaMA: `self_attn.q_proj`), or a row block of a fused one
(Phi-3: q, k and v are the rows of `self_attn.qkv_proj`; gate and up the two halves of
`mlp.gate_up_proj`). The family also says which modules turn token ids into the first layer's input,
how many norms each layer has, and under which state-dict prefix the layers are saved.

Adding a family is one `Family` entry here, one class line in modeling_lorap.py, and tiny test
models (docs/architecture.md has the checklist). The modeling file of a checkpoint reads the same
description from `config.lorap["architecture"]` (`Architecture.record`), so it needs no lorap.
"""
from dataclasses import dataclass, field

from torch import nn

from .errors import LorapError
from .modeling_lorap import SplitLinear, module_at, set_module_at

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


class Architecture:
    """A family bound to one model config: the adapter every other module goes through."""

    def __init__(self, config):
        self.family = family_of(config)
        self.config = config
        self.dense_rows = {name: shape[0] for name, shape in {**attention_shapes(config), **ffn_shapes(config)}.items()}
        # logical projection -> module path inside a decoder layer
        self.locations = {name: self.family.projections[name] for name in PROJECTIONS}

    # ------------------------------------------------------------ where things are

    @property
    def state_prefix(self) -> str:
        """What every decoder layer's state-dict keys start with, before the layer number."""
        return self.family.layers + "."

    @property
    def embedding(self) -> str:
        return self.family.before_layers[0]

    def decoder_layers(self, model):
        return module_at(model, self.family.layers)

    def before_layers(self, model) -> list:
        modules = []
        for path in self.family.before_layers:
            try:
                modules.append(module_at(model, path))
            except AttributeError:  # optional (a model without a shared rotary module)
                continue
        return modules

    def input_modules(self, layer) -> dict:
        """{input source: the module whose input it is} (see SHARED_INPUTS)."""
        return {source: module_at(layer, self.locations[source]) for source in SHARED_INPUTS}

    def ffn(self, layer):
        return module_at(layer, self.family.ffn_module)

    # ------------------------------------------------------------ reading and replacing projections

    def projection(self, layer, name: str) -> nn.Module:
        """The module computing logical projection `name` (a row view of a fused linear, read-only)."""
        module, rows = self.holder(layer, name)
        return module if rows is None else _row_view(module, rows)

    def holder(self, layer, name: str) -> tuple:
        """(the linear whose weight holds dense projection `name`, its rows there or None for all)."""
        path = self.locations[name]
        module = module_at(layer, path)
        parts = self.family.fused.get(path)
        if parts is None:
            return module, None
        if isinstance(module, SplitLinear):
            return module.parts[name], None
        # Parts keep their dense rows, except FFN parts, which all have the (pruned) width.
        sizes = [self.dense_rows[part] for part in parts]
        if sum(sizes) != module.out_features and set(parts) <= set(FFN_PROJECTIONS):
            sizes = [module.out_features // len(parts)] * len(parts)
        index = parts.index(name)
        start = sum(sizes[:index])
        return module, slice(start, start + sizes[index])

    def projection_weight(self, layer, name: str, of_weight):
        """`of_weight(weight)` (a per-weight tensor, such as a salience) restricted to the rows of `name`."""
        module, rows = self.holder(layer, name)
        tensor = of_weight(module.weight)
        return tensor if rows is None else tensor[rows]

    def replace(self, layer, modules: dict) -> None:
        """Put new modules in place of logical projections. A fused module whose parts are all plain
        linears is fused again (one matmul, the family's own layout); one holding a factor pair
        becomes a SplitLinear of its parts."""
        by_path: dict = {}
        for name, module in modules.items():
            by_path.setdefault(self.locations[name], {})[name] = module
        for path, replaced in by_path.items():
            parts = self.family.fused.get(path)
            if parts is None:
                (module,) = replaced.values()
                set_module_at(layer, path, module)
                continue
            whole = {name: replaced.get(name) or self._own_module(layer, name) for name in parts}
            set_module_at(layer, path, fuse_or_split(whole))

    def _own_module(self, layer, name: str) -> nn.Module:
        """Projection `name` as a module of its own (a copy of its rows where it is part of a fused linear)."""
        module, rows = self.holder(layer, name)
        return module if rows is None else _row_view(module, rows, copy=True)

    def record(self) -> dict:
        """What the checkpoint's modeling file needs to rebuild compressed shapes (config.lorap)."""
        return {
            "layers": self.family.layers,
            "ffn": self.family.ffn_module,
            "projections": dict(self.family.projections),
            # [part, rows] pairs, a list because config.json is written with sorted keys
            "fused": {path: [[name, self.dense_rows[name]] for name in parts] for path, parts in self.family.fused.items()},
        }


def _row_view(linear: nn.Linear, rows: slice, copy: bool = False) -> nn.Linear:
    """A linear computing rows `rows` of `linear`: sharing its storage (read-only, for reading
    weights), or with `copy` a trainable linear of its own."""
    view = nn.Linear(linear.in_features, rows.stop - rows.start, bias=linear.bias is not None, device="meta")
    take = (lambda t: t.detach()[rows].clone()) if copy else (lambda t: t.detach()[rows])
    view.weight = nn.Parameter(take(linear.weight), requires_grad=copy)
    if linear.bias is not None:
        view.bias = nn.Parameter(take(linear.bias), requires_grad=copy)
    return view


def fuse_or_split(parts: dict) -> nn.Module:
    """One linear stacking the rows of plain linears, or a SplitLinear when a part is factorized."""
    import torch

    modules = list(parts.values())
    if not all(type(m) is nn.Linear for m in modules):
        return SplitLinear(parts)
    first = modules[0]
    bias = any(m.bias is not None for m in modules)
    fused = nn.Linear(first.in_features, sum(m.out_features for m in modules), bias=bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in modules]))
        if bias:
            fused.bias.copy_(torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]))
    return fused
