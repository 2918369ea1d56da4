"""The adapter between a model family (families.py) and a loaded model: where the decoder layers
and their projections live, how a fused projection is read and replaced.

The modeling file of a checkpoint reads the same description from `config.lorap["architecture"]`
(`Architecture.record`), so it needs no lorap.
"""
from torch import nn

from .families import FFN_PROJECTIONS, PROJECTIONS, SHARED_INPUTS, attention_shapes, family_of, ffn_shapes, keep_layers
from .modeling_lorap import SplitLinear, module_at, narrow_head_dims, narrowed_head_sizes, set_module_at


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

    def remove_layers(self, model, removed) -> None:
        """Drop the decoder layers `removed` (indices) from `model`: the others are renumbered (each
        attention's `layer_idx`, its slot in the KV cache) and the model's config describes them alone."""
        layers = self.decoder_layers(model)
        kept = [index for index in range(len(layers)) if index not in set(removed)]
        modules = [layers[index] for index in kept]
        for new_index, layer in enumerate(modules):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
        set_module_at(model, self.family.layers, nn.ModuleList(modules))
        keep_layers(model.config, kept)

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
        # Parts keep their dense rows, except FFN parts, which all have the (pruned) width, and attention
        # parts whose heads were narrowed.
        sizes = [self.dense_rows[part] for part in parts]
        if sum(sizes) != module.out_features and set(parts) <= set(FFN_PROJECTIONS):
            sizes = [module.out_features // len(parts)] * len(parts)
        elif sum(sizes) != module.out_features and hasattr(self.attention(layer), "qk_head_dim"):
            sizes = [self._narrowed_rows(layer)[part] for part in parts]
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

    def attention(self, layer) -> nn.Module:
        """The layer's attention module (the one holding q_proj)."""
        return module_at(layer, self.locations["q_proj"].rpartition(".")[0])

    def _narrowed_rows(self, layer) -> dict:
        """{q_proj, k_proj, v_proj: rows} of a layer whose heads were narrowed."""
        attention = self.attention(layer)
        return narrowed_head_sizes(attention.rope_index.shape[0], attention.num_key_value_groups,
                                   attention.qk_head_dim, attention.v_head_dim)

    def narrow_attention(self, layer, qk_head_dim: int, v_head_dim: int, rope_index) -> None:
        """Make the layer's attention run heads of the narrowed dimensions its projections now have."""
        narrow_head_dims(self.attention(layer), qk_head_dim, v_head_dim, rope_index)

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
