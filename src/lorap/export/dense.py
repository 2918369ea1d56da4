"""A model as serving engines load it: every matrix dense, per-layer shapes spelled out.

No engine runs factor pairs, so each pair's two factors are multiplied back into the matrix they
replaced (left @ right), which costs parameters: the report says how many. Nor does an engine take
narrowed heads (a key/query dimension per layer other than the model's), so they are padded back
with zeros: each kept query/key dimension returns to its place (its RoPE frequency), the reduced
value basis fills the first value dimensions, and the zero rows and columns add nothing to QK^T or
to the output, so the logits are the checkpoint's. FFN widths and head counts stay as compressed.
Tensor names are those of the dense Hugging Face model (LLaMA's).
"""
from dataclasses import dataclass, field

import torch

from ..errors import LorapError
from ..modeling_lorap import SAVED_BUFFERS
from .choices import WEIGHT_DTYPE_NAMES

# The families whose layer is LLaMA's, tensor for tensor (Qwen2 adds q/k/v biases)
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# The weight dtypes an export can write (`--dtype`); norms and biases stay float32 in GGUF
WEIGHT_DTYPES = dict(zip(WEIGHT_DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))
ALLOWED_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
                  "mlp.down_proj.bias")


@dataclass
class DenseModel:
    """Dense tensors (HF names, the model's dtype) and the shapes an engine must be told."""

    config: object  # the transformers config of the source model
    tensors: dict  # name -> tensor
    ffn_widths: list  # per decoder layer
    head_counts: list  # query heads per layer
    kv_head_counts: list  # key/value heads per layer
    head_dim: int
    source_parameters: int  # parameters of the model as lorap holds it (factor pairs as pairs)
    merged_pairs: int = 0
    added_back: int = 0  # parameters the merged pairs cost over their factors
    padded_layers: int = 0  # layers whose narrowed heads were padded back to the head dimension
    added_by_padding: int = 0  # the zeros that padding adds
    notes: list = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(t.numel() for name, t in self.tensors.items() if not self.tied_head_name(name))

    def tied_head_name(self, name: str) -> bool:
        return name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def uniform(self) -> bool:
        """Every layer has the same shapes (a plain LLaMA file can say so)."""
        return len({*zip(self.ffn_widths, self.head_counts, self.kv_head_counts)}) == 1


def check_exportable(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise LorapError(
            f"export supports the LLaMA layer layout ({', '.join(SUPPORTED_TYPES)}: LLaMA 1/2/3, Mistral, Qwen2/2.5, "
            f"SmolLM, TinyLlama); this model is '{model_type}', which these formats cannot express yet"
        )
    if getattr(config, "sliding_window", None) and config.sliding_window < getattr(config, "max_position_embeddings", 0):
        raise LorapError(
            f"this model attends within a sliding window of {config.sliding_window} tokens, which the LLaMA layouts of "
            "llama.cpp and DeciLM do not express; it cannot be exported without changing what it computes"
        )
    if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
        raise LorapError("export does not handle models whose dense layers carry biases (attention_bias / mlp_bias)")


def recorded_ffn_widths(config) -> list:
    """Each layer's FFN width as the config records it (a lorap checkpoint's layout, or the dense width)."""
    layers = (getattr(config, "lorap", None) or {}).get("layers") or [{}] * config.num_hidden_layers
    return [layer.get("intermediate_size") or config.intermediate_size for layer in layers]


@torch.no_grad()
def dense_model(model) -> DenseModel:
    """Merge every factor pair of a (lorap or dense) LLaMA-layout model; read its per-layer shapes."""
    config = model.config
    check_exportable(config)
    # The model's own tensors (its dtype, no copies); only merged pairs are new tensors, computed in
    # float32 and stored in the model's dtype.
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    tensors, merged, added = {}, 0, 0
    for name, tensor in state.items():
        if name.endswith(".right.weight"):
            prefix = name[: -len(".right.weight")]
            left = state[prefix + ".left.weight"]
            tensors[prefix + ".weight"] = (left.float() @ tensor.float()).to(tensor.dtype)  # (out, rank) @ (rank, in)
            if prefix + ".left.bias" in state:
                tensors[prefix + ".bias"] = state[prefix + ".left.bias"]
            merged += 1
            added += left.shape[0] * tensor.shape[1] - tensor.numel() - left.numel()
        elif ".left." not in name and not name.endswith(SAVED_BUFFERS):
            tensors[name] = tensor
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    padded = [_pad_narrowed_heads(tensors, f"model.layers.{index}.self_attn.", layer.self_attn, head_dim)
              for index, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "qk_head_dim")]
    n_layers = config.num_hidden_layers
    layer = "model.layers.{}.{}.weight"
    ffn_widths = [tensors[layer.format(i, "mlp.up_proj")].shape[0] for i in range(n_layers)]
    heads = [tensors[layer.format(i, "self_attn.q_proj")].shape[0] // head_dim for i in range(n_layers)]
    kv_heads = [tensors[layer.format(i, "self_attn.k_proj")].shape[0] // head_dim for i in range(n_layers)]
    for name in tensors:
        if name.endswith(".bias") and not name.endswith(ALLOWED_BIASES):
            raise LorapError(f"{name}: a bias here has no place in the exported layouts")
    source_parameters = sum(t.numel() for n, t in state.items()
                            if not (n == "lm_head.weight" and config.tie_word_embeddings) and not n.endswith(SAVED_BUFFERS))
    return DenseModel(config, tensors, ffn_widths, heads, kv_heads, head_dim, source_parameters, merged, added,
                      len(padded), sum(padded))


def _scatter_rows(narrowed: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """A [total, ...] tensor of zeros holding `narrowed`'s rows at `rows`."""
    padded = narrowed.new_zeros((total, *narrowed.shape[1:]))
    padded[rows] = narrowed
    return padded


def _pad_narrowed_heads(tensors: dict, prefix: str, attention, head_dim: int) -> int:
    """Pad one layer's narrowed q, k, v and o back to whole heads in `tensors` (module docstring);
    returns the parameters the zeros add."""
    rope_index = attention.rope_index.cpu()
    groups, qk = rope_index.shape
    per_group = attention.num_key_value_groups
    v = attention.v_head_dim
    kept_values = torch.arange(v)
    query_rows = torch.cat([head * head_dim + rope_index[head // per_group] for head in range(groups * per_group)])
    key_rows = torch.cat([group * head_dim + rope_index[group] for group in range(groups)])
    value_rows = torch.cat([group * head_dim + kept_values for group in range(groups)])
    output_columns = torch.cat([head * head_dim + kept_values for head in range(groups * per_group)])
    names = [prefix + name + kind for name in ("q_proj", "k_proj", "v_proj", "o_proj") for kind in (".weight", ".bias")
             if prefix + name + kind in tensors]
    before = sum(tensors[name].numel() for name in names)
    for name, rows, heads in (("q_proj", query_rows, groups * per_group), ("k_proj", key_rows, groups),
                              ("v_proj", value_rows, groups)):
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            if key in tensors:
                tensors[key] = _scatter_rows(tensors[key], rows, heads * head_dim)
    o_proj = tensors[prefix + "o_proj.weight"]
    tensors[prefix + "o_proj.weight"] = _scatter_rows(o_proj.T, output_columns, groups * per_group * head_dim).T.contiguous()
    return sum(tensors[name].numel() for name in names) - before
