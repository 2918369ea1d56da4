"""Model classes for LoRAP-compressed checkpoints.

This file is copied into every checkpoint lorap writes and is referenced from its
config.json `auto_map`, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
works where lorap is not installed. It must therefore import nothing from lorap.

The compressed shapes are recorded in `config.lorap["layers"]`: for each decoder layer, the
rank of each attention projection (null when it stayed dense), the FFN width kept, where the FFN's
projections were factorized too the rank of gate_proj, up_proj and down_proj, and
`down_proj_bias: true` where the down projection gained a bias (compensated channels), and where
heads were removed, the layer's `num_attention_heads` and `num_key_value_heads` (with
`o_proj_bias: true` where o_proj gained a bias). The attention code of these families reads a
layer's head count from its projections' widths, so narrowing the projections is all it takes.
Where each head kept fewer dimensions (head-dimension narrowing), the layer records `qk_head_dim`
(query/key dims per head, even) and `v_head_dim` (value dims per head). Which dense dims each KV
group's queries and keys kept is data the compression chose, so it is saved with the weights, as
the attention's `rope_index` buffer (KV groups x qk_head_dim): the RoPE dims i < head_dim/2 in
ascending order, then their partners i + head_dim/2 in the same order (a layout may also give it
as `rope_index`, lists per group). q/k rows (and biases) follow that order per
head, v keeps v_head_dim rows per group and o_proj v_head_dim columns per query head; the layer's
attention then runs HeadDimAttention's forward, so its KV cache holds the narrowed dims.
A model whose layers were removed whole (ShortGPT) is a plain smaller model: its config has fewer
layers, renumbered, and `layers` one entry per kept layer (`removed_layers` names the dense ones gone).
`config.lorap["architecture"]` says where the projections live (written by lorap's
architectures.py; checkpoints without it have LLaMA's names): the decoder layer list, the
module of each logical projection, and the fused modules with [part, rows] in row order.
"""
import torch
from torch import nn
from transformers import GemmaForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma import modeling_gemma
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LLAMA_ARCHITECTURE = {
    "layers": "model.layers",
    "ffn": "mlp",
    "projections": {
        **{name: f"self_attn.{name}" for name in ATTENTION_PROJECTIONS},
        **{name: f"mlp.{name}" for name in FFN_PROJECTIONS},
    },
    "fused": {},
}


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
        shared = self.__dict__.get("_shared_right")  # set by fuse_factor_pairs; not a submodule
        if shared is not None and shared.serves(self, x):
            return self.left(shared.right_output(self, x))
        return self.left(self.right(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SharedRightFactors:
    """One GEMM for the right factors of factor pairs that read the same input (q, k and v).

    The pairs' `right.weight` parameters become row slices of one contiguous matrix, so the
    parameters, their names and the saved tensors stay as they were, while the first pair to see
    an input computes every pair's right product at once and the others take their slice.

    It serves only inference (no autograd graph) with the weights still where fusing put them:
    training (PEFT wraps `right`, gradients must reach each parameter), a model moved or reloaded
    after fusing, or an input nobody else reads all fall back to the pair's own two GEMMs.
    """

    def __init__(self, members: list):
        self.members = list(members)
        self.weight = torch.cat([member.right.weight.detach() for member in self.members])
        self.sizes = [member.rank for member in self.members]
        offset = 0
        for member, size in zip(self.members, self.sizes):
            member.right.weight = nn.Parameter(self.weight[offset : offset + size],
                                               requires_grad=member.right.weight.requires_grad)
            offset += size
            member.__dict__["_shared_right"] = self
        self.pointers = {id(member): member.right.weight.data_ptr() for member in self.members}
        self._input, self._outputs = None, {}

    def serves(self, member, x) -> bool:
        return (not torch.is_grad_enabled() and type(member.right) is nn.Linear
                and member.right.weight.data_ptr() == self.pointers[id(member)] and x.device == self.weight.device)

    def right_output(self, member, x):
        if self._input is not x or id(member) not in self._outputs:
            outputs = torch.nn.functional.linear(x, self.weight).split(self.sizes, dim=-1)
            self._input, self._outputs = x, {id(m): out for m, out in zip(self.members, outputs)}
        output = self._outputs.pop(id(member))
        if not self._outputs:
            self._input = None  # the last reader: hold no activation past this layer
        return output


def _clone_fused_views(module, state_dict, prefix, local_metadata):
    """Saved tensors must not share storage (safetensors refuses it): save fused slices as copies."""
    key = prefix + "right.weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].clone()
    return state_dict


class SplitLinear(nn.Module):
    """A fused projection (Phi-3's qkv_proj) whose parts were compressed apart: each part is a
    linear or a factor pair, and the output is their outputs side by side, as the fused one's."""

    def __init__(self, parts: dict):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        first = next(iter(parts.values()))
        self.in_features = first.in_features
        self.out_features = sum(part.out_features for part in parts.values())

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts.values()], dim=-1)


def module_at(root, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_module_at(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module_at(root, parent) if parent else root, name, module)


def _linear(in_features, out_features, bias, like):
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


HEAD_DIM_KEYS = ("qk_head_dim", "v_head_dim", "rope_index")
# Saved tensors that are not parameters (what counts of parameters skip)
SAVED_BUFFERS = (".rope_index",)


def _attention_module(layer, architecture: dict):
    return module_at(layer, architecture["projections"]["q_proj"].rpartition(".")[0])


def _head_dim_layout(attention, layout: dict):
    """(qk_head_dim, v_head_dim, rope_index as a (KV groups, qk_head_dim) long tensor) of a layer whose
    heads were narrowed, or None where the layout keeps them whole; a malformed layout is refused
    here rather than as a shape mismatch when the weights load."""
    if not any(key in layout for key in HEAD_DIM_KEYS):
        return None
    config, head_dim = attention.config, attention.head_dim
    # the narrowed q/k gather cos/sin at their kept dims, which presumes every dim is rotated
    if getattr(config, "partial_rotary_factor", 1.0) < 1:
        raise ValueError(f"head-dimension narrowing needs full rotary embeddings; this {config.model_type} model "
                         f"rotates only a part of each head (partial_rotary_factor={config.partial_rotary_factor})")
    groups = layout.get("num_key_value_heads") or config.num_key_value_heads
    rope_index = layout.get("rope_index")
    qk = layout.get("qk_head_dim", head_dim if rope_index is None else len(rope_index[0]) if rope_index else 0)
    v = layout.get("v_head_dim", head_dim)
    if rope_index is None:  # the saved buffer fills it in when the weights load; a valid stand-in until then
        pairs = list(range(qk // 2))
        rope_index = [pairs + [i + head_dim // 2 for i in pairs]] * groups
    try:
        index = torch.tensor(rope_index, dtype=torch.long)
    except (TypeError, ValueError) as error:
        raise ValueError(f"rope_index must be one list of {qk} ints per KV group: {error}") from None
    half = head_dim // 2
    if qk % 2 or not 2 <= qk <= head_dim or not 1 <= v <= head_dim:
        raise ValueError(f"qk_head_dim {qk} must be even and in [2, {head_dim}], v_head_dim {v} in [1, {head_dim}]")
    if tuple(index.shape) != (groups, qk):
        raise ValueError(f"rope_index has shape {tuple(index.shape)}, expected ({groups} KV groups, {qk} dims)")
    first, second = index[:, : qk // 2], index[:, qk // 2 :]
    if ((first < 0) | (first >= half)).any() or (first.diff(dim=1) <= 0).any() or not torch.equal(second, first + half):
        raise ValueError(f"each rope_index row must be ascending dims i < {half} then the same dims + {half}")
    return qk, v, index


def _allocate_values_of_their_width(cache, layer_idx: int, key, value) -> None:
    """Before a preallocated cache layer's first update, give its values their own head size. A static
    cache (transformers' StaticCache, which generate() compiles with) allocates a layer's values as wide
    as its keys, and heads whose value and query/key dimensions differ would not fit. Caches that grow
    by concatenation (the default dynamic cache) take any width and are left alone."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or key.shape[-1] == value.shape[-1]:
        return
    layer = layers[layer_idx]
    if getattr(layer, "is_initialized", True) or not getattr(layer, "is_compileable", False):
        return
    layer.lazy_initialization(key)
    layer.values = layer.values.new_zeros((*layer.values.shape[:-1], value.shape[-1]))
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(layer.values)


class HeadDimAttention:
    """Attention whose heads keep `qk_head_dim` query/key dims and `v_head_dim` value dims, mixed in
    before a family's attention class and swapped onto the instance by narrow_head_dims.

    Each KV group g kept the dense dims `rope_index[g]` of its queries and keys, in RoPE pair order,
    so cos/sin are gathered at those dims and rotate_half on the narrowed vectors pairs the same dims
    the dense one does. `scaling` stays the dense head_dim's: the narrowed q.k approximates the dense
    one. The cache receives the narrowed keys and values. Each family's class below names its own
    eager attention and the extra arguments its attention call passes."""

    def _project(self, hidden_states):
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def _attention_kwargs(self) -> dict:
        """Keyword arguments the family adds to its attention call (its sliding window)."""
        return {}

    def _pads_to_one_head_size(self, query) -> bool:
        """Whether to zero-pad queries, keys and values to one head size for this attention call: with
        SDPA on the CPU over several queries (a prompt) whose query/key and value head sizes differ.
        PyTorch's fused CPU kernel needs one size; without it SDPA falls back to materializing every
        score, several times slower over a prompt. Zero dims change no score and no output (the scale is
        passed). A single decode query is left unpadded: there the fallback costs little, and a pad would
        copy the whole key cache every token."""
        return (self.qk_head_dim != self.v_head_dim and self.config._attn_implementation == "sdpa"
                and query.device.type == "cpu" and query.shape[-2] > 1)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None,
                cache_position=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        groups = self.rope_index.shape[0]
        query, key, value = self._project(hidden_states)
        query = query.view(*input_shape, groups, -1, self.qk_head_dim)  # (B, T, KV, queries per group, qk)
        key = key.view(*input_shape, groups, self.qk_head_dim)
        value = value.view(*input_shape, groups, self.v_head_dim).transpose(1, 2)

        cos, sin = position_embeddings  # (B, T, head_dim) -> each group's kept dims (B, T, KV, qk)
        cos, sin = cos[..., self.rope_index], sin[..., self.rope_index]
        key = key * cos + modeling_llama.rotate_half(key) * sin
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        query = query * cos + modeling_llama.rotate_half(query) * sin
        query, key = query.flatten(2, 3).transpose(1, 2), key.transpose(1, 2)

        if past_key_values is not None:
            dense_cos, dense_sin = position_embeddings
            cache_kwargs = {"sin": dense_sin, "cos": dense_cos, "cache_position": cache_position}
            _allocate_values_of_their_width(past_key_values, self.layer_idx, key, value)
            key, value = past_key_values.update(key, value, self.layer_idx, cache_kwargs)

        attention_interface = self._eager_attention
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        padded = self._pads_to_one_head_size(query)
        if padded:
            width = max(self.qk_head_dim, self.v_head_dim)
            query, key = (nn.functional.pad(states, (0, width - self.qk_head_dim)) for states in (query, key))
            value = nn.functional.pad(value, (0, width - self.v_head_dim))
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self._attention_kwargs(),
            **kwargs,
        )
        if padded:
            attn_output = attn_output[..., : self.v_head_dim]
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LlamaHeadDimAttention(HeadDimAttention, modeling_llama.LlamaAttention):
    _eager_attention = staticmethod(modeling_llama.eager_attention_forward)


class GemmaHeadDimAttention(HeadDimAttention, modeling_gemma.GemmaAttention):
    _eager_attention = staticmethod(modeling_gemma.eager_attention_forward)


class MistralHeadDimAttention(HeadDimAttention, modeling_mistral.MistralAttention):
    _eager_attention = staticmethod(modeling_mistral.eager_attention_forward)

    def _attention_kwargs(self) -> dict:
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class Qwen2HeadDimAttention(HeadDimAttention, modeling_qwen2.Qwen2Attention):
    _eager_attention = staticmethod(modeling_qwen2.eager_attention_forward)

    def _attention_kwargs(self) -> dict:
        return {"sliding_window": self.sliding_window}


class Phi3HeadDimAttention(HeadDimAttention, modeling_phi3.Phi3Attention):
    _eager_attention = staticmethod(modeling_phi3.eager_attention_forward)

    def _project(self, hidden_states):
        groups = self.rope_index.shape[0]
        qk_rows = groups * self.qk_head_dim
        sizes = [qk_rows * self.num_key_value_groups, qk_rows, groups * self.v_head_dim]  # rows [q | k | v]
        return self.qkv_proj(hidden_states).split(sizes, dim=-1)

    def _attention_kwargs(self) -> dict:
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


HEAD_DIM_ATTENTION = {  # a family's attention class: its narrowed one
    modeling_llama.LlamaAttention: LlamaHeadDimAttention,
    modeling_gemma.GemmaAttention: GemmaHeadDimAttention,
    modeling_mistral.MistralAttention: MistralHeadDimAttention,
    modeling_qwen2.Qwen2Attention: Qwen2HeadDimAttention,
    modeling_phi3.Phi3Attention: Phi3HeadDimAttention,
}


def narrow_head_dims(attention, qk_head_dim: int, v_head_dim: int, rope_index) -> None:
    """Make `attention` (a family's attention module, its projections already narrowed) run the
    narrowed forward. The rope indices are a buffer saved with the weights: they were chosen from
    data, and a layer compressed in an earlier (resumed) run has them only in its saved tensors."""
    family = type(attention)
    if family not in HEAD_DIM_ATTENTION:
        raise ValueError(f"head-dimension narrowing does not support {family.__name__}")
    attention.__class__ = HEAD_DIM_ATTENTION[family]
    attention.qk_head_dim, attention.v_head_dim = qk_head_dim, v_head_dim
    device = next(attention.parameters()).device
    device = torch.device("cpu") if device.type == "meta" else device
    attention.register_buffer("rope_index", torch.as_tensor(rope_index, dtype=torch.long, device=device))


# The projections narrowed on their input side (the others on their output side)
NARROWED_INPUTS = ("o_proj", "down_proj")


def _narrowed_sizes(layer, layout: dict, architecture: dict) -> dict:
    """{projection: its narrowed size (output rows, or input columns for NARROWED_INPUTS)}: the FFN's
    kept width, where heads were removed, the kept heads' rows of q, k, v and columns of o, and where
    heads were narrowed, their kept dims' rows and columns."""
    sizes = {}
    if layout.get("intermediate_size") is not None:
        sizes.update({name: layout["intermediate_size"] for name in FFN_PROJECTIONS})
    if layout.get("num_key_value_heads") is not None:
        attention = module_at(layer, architecture["projections"]["q_proj"].rpartition(".")[0])
        queries, kv = layout["num_attention_heads"] * attention.head_dim, layout["num_key_value_heads"] * attention.head_dim
        sizes.update(q_proj=queries, k_proj=kv, v_proj=kv, o_proj=queries)
    attention = _attention_module(layer, architecture)
    narrowed = _head_dim_layout(attention, layout)
    if narrowed is not None:
        qk, v, rope_index = narrowed
        sizes.update(narrowed_head_sizes(rope_index.shape[0], attention.num_key_value_groups, qk, v))
    return sizes


def narrowed_head_sizes(kv_groups: int, queries_per_group: int, qk_head_dim: int, v_head_dim: int) -> dict:
    """{q_proj, k_proj, v_proj: rows, o_proj: columns} of narrowed heads (head removal drops whole groups,
    so the groups kept count)."""
    heads = kv_groups * queries_per_group
    return {"q_proj": heads * qk_head_dim, "k_proj": kv_groups * qk_head_dim, "v_proj": kv_groups * v_head_dim,
            "o_proj": heads * v_head_dim}


def _layer_modules(layer, layout: dict, architecture: dict) -> dict:
    """{module path: new module} giving one decoder layer the recorded compressed shapes."""
    # biases gained by compensating removed channels or heads
    gained_bias = {"down_proj": bool(layout.get("down_proj_bias")), "o_proj": bool(layout.get("o_proj_bias"))}
    narrowed = _narrowed_sizes(layer, layout, architecture)
    by_path: dict = {}
    for name, path in architecture["projections"].items():
        by_path.setdefault(path, []).append(name)
    replacements = {}
    for path, names in by_path.items():
        module = module_at(layer, path)
        sizes = dict(architecture["fused"].get(path) or [[names[0], module.out_features]])  # in row order
        bias = module.bias is not None
        built, changed = {}, False
        for name in sizes:
            out_features, in_features = sizes[name], module.in_features
            rank = layout.get(name)  # a factor pair's rank, for any projection (the FFN's too: SVD-LLM)
            if name in narrowed:
                changed |= narrowed[name] != (in_features if name in NARROWED_INPUTS else out_features)
                if name in NARROWED_INPUTS:
                    in_features = narrowed[name]
                else:
                    out_features = narrowed[name]
            part_bias = bias or gained_bias.get(name, False)
            changed |= rank is not None or part_bias != bias
            if rank is not None:
                built[name] = LowRankLinear(in_features, out_features, rank, bias=bias,
                                            device=module.weight.device, dtype=module.weight.dtype)
            else:
                built[name] = _linear(in_features, out_features, part_bias, module)
        if not changed:
            continue
        if len(built) == 1:
            replacements[path] = next(iter(built.values()))
        elif all(type(part) is nn.Linear for part in built.values()):
            first = next(iter(built.values()))
            replacements[path] = _linear(first.in_features, sum(p.out_features for p in built.values()), bias, module)
        else:
            replacements[path] = SplitLinear(built)
    return replacements


def apply_layout(model, layers_layout, architecture=None):
    """Give a freshly built dense model the shapes of a compressed one (weights are loaded after)."""
    architecture = architecture or LLAMA_ARCHITECTURE
    decoder_layers = module_at(model, architecture["layers"])
    if len(layers_layout) != len(decoder_layers):
        raise ValueError(f"layout has {len(layers_layout)} layers, model has {len(decoder_layers)}")
    for layer, layout in zip(decoder_layers, layers_layout):
        for path, module in _layer_modules(layer, layout, architecture).items():
            set_module_at(layer, path, module)
        attention = _attention_module(layer, architecture)
        narrowed = _head_dim_layout(attention, layout)
        if narrowed is not None:
            narrow_head_dims(attention, *narrowed)
        ffn = module_at(layer, architecture["ffn"])
        if layout.get("intermediate_size") is not None and hasattr(ffn, "intermediate_size"):
            ffn.intermediate_size = layout["intermediate_size"]


SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"),)  # projections that read the same tensor


def _projection_module(layer, architecture: dict, name: str):
    path = architecture["projections"][name]
    module = module_at(layer, path)
    return module.parts[name] if isinstance(module, SplitLinear) else module


def fuse_factor_pairs(model, architecture=None) -> int:
    """Give the factor pairs of each decoder layer that share an input one GEMM for their right
    factors (see SharedRightFactors); returns the number of groups fused. Call it after the model
    is on its device and in its dtype, for inference; training and saving are unaffected."""
    architecture = architecture or LLAMA_ARCHITECTURE
    fused = 0
    for layer in module_at(model, architecture["layers"]):
        for group in SHARED_INPUT_GROUPS:
            members = [module for name in group
                       if isinstance(module := _projection_module(layer, architecture, name), LowRankLinear)
                       and type(module.right) is nn.Linear and "_shared_right" not in module.__dict__]
            if len(members) < 2:
                continue
            SharedRightFactors(members)
            for member in members:
                member._register_state_dict_hook(_clone_fused_views)
            fused += 1
    return fused


def _contiguous_weight(module, state_dict, prefix, local_metadata):
    """Saved tensors stay in the plain row-major layout, whatever layout inference gave them."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].contiguous()
    return state_dict


def column_major_left_factors(model) -> int:
    """Store each factor pair's left factor (out x rank) column by column, on the CPU; returns how
    many. The values, shape and saved layout stay as they were.

    Why: at one token the left product is a matrix-vector product over rows only `rank` long, and
    the CPU's kernel streams short rows more slowly than long ones. Stored column by column, the
    same product reads the weight along `out` (benchmarks/left_layout.py, 2 threads, fp32, one
    token: 4096 x 512 0.96 -> 0.55 ms, 4096 x 1216 1.77 -> 1.39 ms, 576 x 192 0.075 -> 0.052 ms; a
    512-token prefill within 3%). Not applied on a GPU, where it is unmeasured."""
    count = 0
    for module in model.modules():
        if not isinstance(module, LowRankLinear) or type(module.left) is not nn.Linear:
            continue
        weight = module.left.weight
        if weight.device.type != "cpu" or not weight.is_contiguous() or weight.shape[1] == 1:
            continue
        weight.data = weight.data.t().contiguous().t()  # same Parameter object, new strides
        module.left._register_state_dict_hook(_contiguous_weight)
        count += 1
    return count


def optimize_for_inference(model, architecture=None) -> dict:
    """The runtime lorap loads checkpoints with: q/k/v's right factors in one GEMM (fuse_factor_pairs)
    and, on the CPU, left factors stored column by column (column_major_left_factors). Call it after
    the model is on its device and in its dtype; parameters, gradients and saved tensors keep their
    values, names and layout."""
    return {"fused_groups": fuse_factor_pairs(model, architecture),
            "column_major_left_factors": column_major_left_factors(model)}


class _LorapMixin:
    """Builds the base architecture, then narrows it to the recorded compressed shapes."""

    def __init__(self, config):
        super().__init__(config)
        lorap = getattr(config, "lorap", None)
        if lorap is not None:
            apply_layout(self, lorap["layers"], lorap.get("architecture"))

    def fuse_factor_pairs(self) -> int:
        """One GEMM for the right factors of q/k/v in each layer (faster prefill); see fuse_factor_pairs."""
        lorap = getattr(self.config, "lorap", None) or {}
        return fuse_factor_pairs(self, lorap.get("architecture"))

    def optimize_for_inference(self) -> dict:
        """The faster runtime (fused right factors, column-major left factors on the CPU); see
        optimize_for_inference. Call it once the model is on its device and in its dtype."""
        lorap = getattr(self.config, "lorap", None) or {}
        return optimize_for_inference(self, lorap.get("architecture"))


class LorapLlamaForCausalLM(_LorapMixin, LlamaForCausalLM):
    pass


class LorapMistralForCausalLM(_LorapMixin, MistralForCausalLM):
    pass


class LorapQwen2ForCausalLM(_LorapMixin, Qwen2ForCausalLM):
    pass


class LorapGemmaForCausalLM(_LorapMixin, GemmaForCausalLM):
    pass


class LorapPhi3ForCausalLM(_LorapMixin, Phi3ForCausalLM):
    pass
