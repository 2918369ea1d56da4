"""The plan: ranks of attention factors (or kept attention heads) and widths of FFNs, a pure
function of shapes and the ratio.

Nothing here touches weights, so `lorap plan` can print it from a config.json alone, and the
reference figures of the paper (LLaMA-7B) are unit-tested without a model.
"""
import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial

from ..errors import LorapError
from ..families import ATTENTION_PROJECTIONS, attention_shapes, family_of, ffn_shapes, head_dim, other_parameters
from ..methods.registry import (ATTENTION_METHODS, FFN_METHODS, FFN_UPDATES, HEAD_UPDATES, LAYER_ALLOCATIONS, LAYER_REMOVAL,
                                RANK_ALLOCATIONS, SHARE_RANKS)
from ..options import csv_of, setting
from . import alignment
from .alignment import AUTO_ALIGN, PAIR_LIMITS, default_alignments, pair_max_fraction, parse_align
from .counting import linear_parameters
from .ranks import MAX_RATIO, aligned_ranks, attention_ranks, ffn_kept_width, no_limit, share_ranks

EXACT_TOLERANCE = 0.002  # exact mode must land within 0.2 percentage points
SUBLAYERS = ("attention", "ffn")
MODES = ("reference", "exact")


@dataclass
class PlanSettings:
    """What the plan depends on. Every default here is the paper's, and this is the one place it is
    written: CompressionConfig extends this class, and the CLI's flags come from these fields."""

    ratio: float = setting(0.2, f"fraction of parameters to remove, in (0, {MAX_RATIO}]")
    mode: str = setting(
        "reference",
        "reference: RATIO of every layer's attention and FFN, as in the paper (the whole model loses a bit less); "
        "exact: RATIO of the whole model's parameters, within 0.2 points", choices=MODES)
    allocation_a: float = setting(3.0, "kept (v+o):(q+k) parameters of a layer's factor pairs (with --attention "
                                  "headdim: kept value to query/key dimensions)", short="-a")
    bottom_keep: float = setting(0.01, "share of the lowest-scoring FFN channels kept anyway")
    sublayers: tuple = setting(SUBLAYERS, "what to compress: attention, ffn or both (comma-separated)",
                               parse=csv_of(str))
    # adds a bias? (registry.FFN_UPDATES; CompressionConfig offers it with the other method parts)
    ffn_update: str = FFN_UPDATES.default
    attention_scale: float = setting(1.0, "attention's per-layer ratio as a multiple of the FFN's")
    align: int | str = setting(
        1, "make every rank and FFN width a multiple of N, shapes the matrix kernels run faster; exact mode still "
        f"meets the budget. '{AUTO_ALIGN}': this device's measured multiple (docs/records/speed.md), which best and the "
        "baselines use", parse=parse_align)
    # Whose measured limits keep dense a factor pair too large to run faster than its matrix
    # ("none": only a pair that is not smaller, the paper's rule; "auto" alignment sets the device's)
    pair_limit: str = "none"
    attention: str = setting(
        ATTENTION_METHODS[0], "lowrank: factor pairs (the paper); heads: remove whole KV groups with their query "
        "heads (each head is its own group without GQA); headdim: keep every head but narrow its query/key and "
        "value dimensions, plain matrices that also shrink the KV cache (MoDeGPT's attention)", choices=ATTENTION_METHODS)
    head_update: str = HEAD_UPDATES.default  # adds a bias to o_proj? (registry.HEAD_UPDATES)
    ffn: str = setting(
        FFN_METHODS[0], "channels: remove whole FFN channels (the paper); lowrank: gate, up and down become factor "
        "pairs by --factorization, each keeping the same share of its parameters (SVD-LLM's FFN)", choices=FFN_METHODS)
    # How attention's ranks come from its kept parameters, and whether whole layers go (registry.RANK_ALLOCATIONS,
    # registry.LAYER_ALLOCATIONS; CompressionConfig offers them with the other method parts)
    rank_allocation: str = RANK_ALLOCATIONS.default
    layer_allocation: str = LAYER_ALLOCATIONS.default

    def validate(self) -> None:
        if not (0 < self.ratio <= MAX_RATIO):
            raise LorapError(f"ratio must be in (0, {MAX_RATIO}], got {self.ratio}")
        if self.mode not in MODES:
            raise LorapError(f"mode must be 'reference' or 'exact', got {self.mode!r}")
        if self.allocation_a <= 0:
            raise LorapError(f"the allocation hyper-parameter a must be positive, got {self.allocation_a}")
        if not (0 <= self.bottom_keep < 1):
            raise LorapError(f"bottom-keep fraction must be in [0, 1), got {self.bottom_keep}")
        unknown = set(self.sublayers) - set(SUBLAYERS)
        if unknown or not self.sublayers:
            raise LorapError(f"sublayers must be a non-empty subset of {', '.join(SUBLAYERS)}, got {self.sublayers}")
        if self.attention_scale <= 0:
            raise LorapError(f"attention scale must be positive, got {self.attention_scale}")
        if self.align != AUTO_ALIGN and (isinstance(self.align, bool) or not isinstance(self.align, int) or self.align <= 0):
            raise LorapError(f"--align must be a positive integer (1: no alignment) or '{AUTO_ALIGN}', got {self.align!r}")
        if self.pair_limit not in PAIR_LIMITS:
            raise LorapError(f"pair limit must be one of {', '.join(PAIR_LIMITS)}, got {self.pair_limit!r}")
        FFN_UPDATES[self.ffn_update]  # a registered name
        if self.attention not in ATTENTION_METHODS:
            raise LorapError(f"--attention must be one of {', '.join(ATTENTION_METHODS)}, got {self.attention!r}")
        HEAD_UPDATES[self.head_update]
        if self.ffn not in FFN_METHODS:
            raise LorapError(f"--ffn must be one of {', '.join(FFN_METHODS)}, got {self.ffn!r}")
        RANK_ALLOCATIONS[self.rank_allocation]
        LAYER_ALLOCATIONS[self.layer_allocation]

    @property
    def removes_layers(self) -> bool:
        """Whole decoder layers go (ShortGPT); the kept ones stay as they are."""
        return self.layer_allocation == LAYER_REMOVAL


@dataclass
class LayerPlan:
    index: int
    ranks: dict  # projection -> rank, or None for a dense projection
    ffn_width: int  # intermediate channels kept
    down_bias_added: bool = False  # the down projection gains a bias (compensation of removed channels)
    # Head pruning (None: attention keeps its heads): KV heads and query heads kept, and whether o_proj
    # gains a bias (compensation of removed heads)
    kv_heads: int | None = None
    heads: int | None = None
    o_bias_added: bool = False
    # Head-dimension narrowing (None: every head keeps its dimensions): query/key and value dimensions
    # kept per head
    qk_head_dim: int | None = None
    v_head_dim: int | None = None
    # FFN factor pairs (--ffn lowrank): {gate_proj, up_proj, down_proj: rank, or None for dense}; None: channels
    ffn_ranks: dict | None = None
    removed: bool = False  # the whole layer is removed (ShortGPT): the checkpoint has no such layer

    def layout(self) -> dict:
        """What a checkpoint records to rebuild this layer's shapes."""
        layout = {**self.ranks, "intermediate_size": self.ffn_width}
        if self.ffn_ranks is not None:
            layout.update(self.ffn_ranks)
        if self.down_bias_added:
            layout["down_proj_bias"] = True
        if self.kv_heads is not None:
            layout.update(num_attention_heads=self.heads, num_key_value_heads=self.kv_heads)
        if self.o_bias_added:
            layout["o_proj_bias"] = True
        if self.qk_head_dim is not None:
            layout.update(qk_head_dim=self.qk_head_dim, v_head_dim=self.v_head_dim)
        return layout


@dataclass
class Plan:
    settings: PlanSettings
    layer_ratio: float  # the per-layer ratio applied (equals settings.ratio in reference mode)
    layers: list
    hidden_size: int
    intermediate_size: int
    attention: dict  # projection -> (out, in, bias) of one layer
    ffn_bias: bool
    other_parameters: int  # embeddings, norms, LM head: never compressed
    head_dim: int  # of every attention head
    layer_norms: int = 0  # parameters of one decoder layer's norms (within other_parameters; a removed layer takes them)
    rows: list = field(default_factory=list)

    @property
    def kv_heads(self) -> int:
        """The dense model's KV heads per layer."""
        return self.attention["k_proj"][0] // self.head_dim

    @property
    def heads(self) -> int:
        return self.attention["q_proj"][0] // self.head_dim

    def __post_init__(self):
        self.rows = module_rows(self)

    @property
    def dense_parameters(self) -> int:
        return self.other_parameters + sum(row["dense_parameters"] for row in self.rows)

    @property
    def removed_layers(self) -> list:
        """Indices of the dense layers removed whole (ShortGPT), in order."""
        return [layer.index for layer in self.layers if layer.removed]

    @property
    def kept_other_parameters(self) -> int:
        """Embeddings, LM head and the kept layers' norms."""
        return self.other_parameters - len(self.removed_layers) * self.layer_norms

    @property
    def compressed_parameters(self) -> int:
        return self.kept_other_parameters + sum(row["parameters"] for row in self.rows)

    @property
    def removed_fraction(self) -> float:
        return 1 - self.compressed_parameters / self.dense_parameters

    def layout(self) -> list:
        """One layout per layer of the compressed model (a removed layer has none)."""
        return [layer.layout() for layer in self.layers if not layer.removed]

    def with_removed_layers(self, indices) -> "Plan":
        """The same plan with exactly the dense layers `indices` removed, counted afresh."""
        removed = set(indices)
        return replace(self, layers=[replace(layer, removed=layer.index in removed) for layer in self.layers])

    def with_ffn_widths(self, widths: list) -> "Plan":
        """The same plan with other per-layer FFN widths (adaptive allocation), counted afresh."""
        if len(widths) != len(self.layers):
            raise ValueError(f"{len(widths)} widths for {len(self.layers)} layers")
        return replace(self, layers=[
            replace(_layer_plan(layer.index, layer.ranks, width, self.settings, self.intermediate_size, self.ffn_bias,
                                layer.kv_heads, self._group_size, layer.o_bias_added),
                    qk_head_dim=layer.qk_head_dim, v_head_dim=layer.v_head_dim, ffn_ranks=layer.ffn_ranks)
            for layer, width in zip(self.layers, widths)
        ])

    def with_head_dims(self, dims: list) -> "Plan":
        """The same plan with other per-layer (query/key, value) head dimensions kept, counted afresh."""
        if len(dims) != len(self.layers):
            raise ValueError(f"{len(dims)} head dimension pairs for {len(self.layers)} layers")
        return replace(self, layers=[replace(layer, qk_head_dim=qk, v_head_dim=v)
                                     for layer, (qk, v) in zip(self.layers, dims)])

    def with_attention_ranks(self, ranks: list) -> "Plan":
        """The same plan with other per-layer ranks (adaptive rank allocation), counted afresh."""
        if len(ranks) != len(self.layers):
            raise ValueError(f"{len(ranks)} rank sets for {len(self.layers)} layers")
        return replace(self, layers=[
            replace(_layer_plan(layer.index, layer_ranks, layer.ffn_width, self.settings, self.intermediate_size,
                                self.ffn_bias, layer.kv_heads, self._group_size, layer.o_bias_added),
                    ffn_ranks=layer.ffn_ranks)
            for layer, layer_ranks in zip(self.layers, ranks)
        ])

    def with_heads_and_widths(self, kv_heads: list, widths: list) -> "Plan":
        """The same plan with other per-layer KV heads kept and FFN widths (adaptive heads), counted afresh."""
        if not len(kv_heads) == len(widths) == len(self.layers):
            raise ValueError(f"{len(kv_heads)} head counts and {len(widths)} widths for {len(self.layers)} layers")
        gains_bias = HEAD_UPDATES[self.settings.head_update].adds_bias and not self.attention["o_proj"][2]
        return replace(self, layers=[
            _layer_plan(layer.index, layer.ranks, width, self.settings, self.intermediate_size, self.ffn_bias,
                        kv, self._group_size, gains_bias and kv < self.kv_heads)
            for layer, kv, width in zip(self.layers, kv_heads, widths)
        ])

    @property
    def _group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def kv_cache_values_per_token(self, dense: bool = False) -> int:
        """Keys and values cached per token, over all layers (times the dtype's bytes: the KV cache)."""
        total = 0
        for layer in self.layers:
            if layer.removed and not dense:
                continue
            kv = self.kv_heads if dense or layer.kv_heads is None else layer.kv_heads
            narrowed = not dense and layer.qk_head_dim is not None
            total += kv * ((layer.qk_head_dim + layer.v_head_dim) if narrowed else 2 * self.head_dim)
        return total

    def to_dict(self) -> dict:
        return {
            "settings": {**asdict(self.settings), "sublayers": list(self.settings.sublayers)},
            "layer_ratio": self.layer_ratio,
            "totals": totals(self),
            "modules": self.rows,
        }


# ---------------------------------------------------------------- counting


def module_rows(plan: Plan) -> list:
    """One row per compressible module: the single source of every parameter figure."""
    rows = []
    for layer in plan.layers:
        if layer.removed:
            rows += _removed_layer_rows(plan, layer.index)
            continue
        kept = kept_attention_shapes(plan, layer)
        for name, (out_f, in_f, bias) in plan.attention.items():
            rank = layer.ranks[name]
            out_k, in_k, kept_bias = kept[name]
            row = {
                "layer": layer.index,
                "module": name,
                "shape": [out_k, in_k],
                "rank": rank,
                "dense_parameters": linear_parameters(in_f, out_f, bias),
                "parameters": linear_parameters(in_k, out_k, kept_bias, rank),
            }
            if layer.kv_heads is not None:
                row["heads"] = layer.kv_heads if name in ("k_proj", "v_proj") else layer.heads
            if layer.qk_head_dim is not None:
                row["head_dim"] = layer.v_head_dim if name in ("v_proj", "o_proj") else layer.qk_head_dim
            rows.append(row)
        dense_ffn = ffn_shapes_from(plan, plan.intermediate_size)
        kept_ffn = ffn_shapes_from(plan, layer.ffn_width, layer.down_bias_added)
        for name in dense_ffn:
            (out_d, in_d, bias), (out_k, in_k, kept_bias) = dense_ffn[name], kept_ffn[name]
            rank = None if layer.ffn_ranks is None else layer.ffn_ranks[name]
            row = {
                "layer": layer.index,
                "module": name,
                "shape": [out_k, in_k],
                "width": layer.ffn_width,
                "dense_parameters": linear_parameters(in_d, out_d, bias),
                "parameters": linear_parameters(in_k, out_k, kept_bias, rank),
            }
            if layer.ffn_ranks is not None:
                row["rank"] = rank
            rows.append(row)
    return rows


def _removed_layer_rows(plan: Plan, index: int) -> list:
    """The rows of a layer removed whole: every projection's parameters go (its norms: Plan.layer_norms)."""
    shapes = {**plan.attention, **ffn_shapes_from(plan, plan.intermediate_size)}
    return [{"layer": index, "module": name, "shape": [out_f, in_f], "removed": True,
             "dense_parameters": linear_parameters(in_f, out_f, bias), "parameters": 0}
            for name, (out_f, in_f, bias) in shapes.items()]


def kept_attention_shapes(plan: Plan, layer: LayerPlan) -> dict:
    """{projection: (out, in, bias)} of a layer's attention after head pruning or head-dimension
    narrowing (the dense shapes without)."""
    if layer.qk_head_dim is not None:
        (_, d, qkv_bias), o_bias = plan.attention["q_proj"], plan.attention["o_proj"][2]
        qk, v = layer.qk_head_dim, layer.v_head_dim
        return {"q_proj": (plan.heads * qk, d, qkv_bias), "k_proj": (plan.kv_heads * qk, d, qkv_bias),
                "v_proj": (plan.kv_heads * v, d, qkv_bias), "o_proj": (d, plan.heads * v, o_bias)}
    if layer.kv_heads is None:
        return plan.attention
    q_rows, kv_rows = layer.heads * plan.head_dim, layer.kv_heads * plan.head_dim
    (_, d, qkv_bias), o_bias = plan.attention["q_proj"], plan.attention["o_proj"][2]
    return {"q_proj": (q_rows, d, qkv_bias), "k_proj": (kv_rows, d, qkv_bias), "v_proj": (kv_rows, d, qkv_bias),
            "o_proj": (d, q_rows, o_bias or layer.o_bias_added)}


def ffn_shapes_from(plan: Plan, width: int, down_bias_added: bool = False) -> dict:
    d = plan.hidden_size
    bias = plan.ffn_bias
    return {"gate_proj": (width, d, bias), "up_proj": (width, d, bias), "down_proj": (d, width, bias or down_bias_added)}


def totals(plan: Plan) -> dict:
    dense, compressed = plan.dense_parameters, plan.compressed_parameters
    attention_rows = [r for r in plan.rows if r["module"] in ATTENTION_PROJECTIONS]
    ffn_rows = [r for r in plan.rows if r["module"] not in ATTENTION_PROJECTIONS]
    result = {
        "dense_parameters": dense,
        "compressed_parameters": compressed,
        "removed_parameters": dense - compressed,
        "removed_fraction": 1 - compressed / dense,
        "untouched_parameters": plan.kept_other_parameters,
        "attention": _group_totals(attention_rows),
        "ffn": _group_totals(ffn_rows),
        # for every plan, so that a low-rank plan says plainly that its cache keeps its size
        "kv_cache_values_per_token": {"dense": plan.kv_cache_values_per_token(dense=True),
                                      "compressed": plan.kv_cache_values_per_token()},
    }
    if plan.removed_layers:
        result["removed_layers"] = {"layers": plan.removed_layers, "of": len(plan.layers),
                                    "norm_parameters": len(plan.removed_layers) * plan.layer_norms}
    return result


def _group_totals(rows: list) -> dict:
    dense = sum(r["dense_parameters"] for r in rows)
    kept = sum(r["parameters"] for r in rows)
    return {"dense_parameters": dense, "parameters": kept, "removed_fraction": 1 - kept / dense if dense else 0.0}


# ---------------------------------------------------------------- the plan


def plan_with_layer_ratio(config, settings: PlanSettings, layer_ratio: float) -> Plan:
    shapes = attention_shapes(config)
    dense_ranks = {name: None for name in ATTENTION_PROJECTIONS}
    compress_attention = "attention" in settings.sublayers
    compress_ffn = "ffn" in settings.sublayers
    attention_ratio = min(layer_ratio * settings.attention_scale, MAX_RATIO)
    ranks, kv_heads, o_bias_added, dims = dense_ranks, None, False, (None, None)
    heads_per_group = shapes["q_proj"][0] // shapes["k_proj"][0]
    limit = no_limit if settings.pair_limit == "none" else partial(pair_max_fraction, settings.pair_limit)
    if compress_attention and settings.attention == "headdim":
        dims = kept_head_dims(config, attention_ratio, settings.allocation_a, settings.align)
        if dims == (head_dim(config),) * 2:  # nothing removed: the layer's attention stays as it is
            dims = (None, None)
    elif compress_attention and settings.attention == "heads":
        kv_heads = kept_kv_heads(config, attention_ratio)
        # compensating removed heads needs a bias on o_proj; a model without attention biases gains one
        removes = kv_heads < kv_groups(config)
        o_bias_added = HEAD_UPDATES[settings.head_update].adds_bias and removes and not shapes["o_proj"][2]
    elif compress_attention:
        if settings.rank_allocation == SHARE_RANKS:
            ranks = share_ranks(shapes, 1 - attention_ratio, limit)
        else:
            ranks = attention_ranks(shapes, 1 - attention_ratio, settings.allocation_a, limit)
        ranks = aligned_ranks(ranks, shapes, settings.align, limit)
    m = config.intermediate_size
    width, ffn_ranks = m, None
    if compress_ffn and settings.ffn == "lowrank":  # SVD-LLM's FFN: every matrix keeps the same share
        dense_ffn = ffn_shapes(config)
        ffn_ranks = aligned_ranks(share_ranks(dense_ffn, 1 - min(layer_ratio, MAX_RATIO), limit), dense_ffn,
                                  settings.align, limit)
    elif compress_ffn:
        width = ffn_kept_width(m, layer_ratio, settings.bottom_keep, settings.align)
    ffn_bias = ffn_shapes(config)["gate_proj"][2]
    layers = [replace(_layer_plan(i, ranks, width, settings, m, ffn_bias, kv_heads, heads_per_group, o_bias_added),
                      qk_head_dim=dims[0], v_head_dim=dims[1], ffn_ranks=ffn_ranks)
              for i in range(config.num_hidden_layers)]
    return Plan(
        settings=settings,
        layer_ratio=layer_ratio,
        layers=layers,
        hidden_size=config.hidden_size,
        intermediate_size=m,
        attention=shapes,
        ffn_bias=ffn_bias,
        other_parameters=other_parameters(config),
        head_dim=head_dim(config),
        layer_norms=family_of(config).norms_per_layer * config.hidden_size,
    )


def plan_with_layer_ratios(config, settings: PlanSettings, ratios: list) -> Plan:
    """A plan whose layer i loses ratios[i] of its attention and FFN (a layer allocation), counted afresh."""
    if len(ratios) != config.num_hidden_layers:
        raise ValueError(f"{len(ratios)} ratios for {config.num_hidden_layers} layers")
    by_ratio = {ratio: plan_with_layer_ratio(config, settings, ratio) for ratio in set(ratios)}
    first = by_ratio[ratios[0]]
    return replace(first, layer_ratio=sum(ratios) / len(ratios),
                   layers=[by_ratio[ratio].layers[index] for index, ratio in enumerate(ratios)])


def kept_kv_heads(config, attention_ratio: float) -> int:
    """KV heads (each with its group of query heads) kept when `attention_ratio` of a layer's attention
    goes: the nearest whole number of groups. Refuses a ratio that would leave a layer no head."""
    family = family_of(config)
    if any(set(parts) & set(ATTENTION_PROJECTIONS) for parts in family.fused.values()):
        raise LorapError(
            f"head pruning needs attention that takes per-layer head counts; {config.model_type}'s fused q/k/v "
            "projection is split by the config's head count in every layer. Use --attention lowrank for this model"
        )
    groups = kv_groups(config)
    kept = math.floor((1 - attention_ratio) * groups + 0.5)
    if kept < 1:
        raise LorapError(
            f"removing {attention_ratio:.0%} of each layer's attention would remove every head of a layer (it has "
            f"{groups} KV group(s)); use a smaller --ratio, --mode exact, or --attention lowrank"
        )
    return kept


# With --align above 1, kept head dimensions are multiples of this (attention kernels tile head dimensions by 8)
HEAD_DIM_MULTIPLE = 8


def head_dim_multiple(align) -> int:
    """What kept head dimensions are multiples of at `align`."""
    return HEAD_DIM_MULTIPLE if align != 1 else 1


def head_dims_refusal(config) -> str | None:
    """Why this model's attention cannot be narrowed per head dimension, or None where it can."""
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return (f"{config.model_type} applies RoPE to part of each head ({config.partial_rotary_factor:g}); narrowing "
                "head dimensions needs RoPE on all of them. Use --attention lowrank for this model")
    if head_dim(config) % 2:
        return f"head dimension {head_dim(config)} is odd; RoPE pairs need an even one. Use --attention lowrank"
    return None


def kept_head_dims(config, attention_ratio: float, allocation_a: float, align) -> tuple:
    """(query/key, value) dimensions each head keeps when `attention_ratio` of a layer's attention goes.

    A query/key dimension and a value dimension cost the same parameters (a row of q for every query
    head and of k for every KV head, against a row of v and a column of o), so the kept dimensions
    add up to (1 - ratio) of twice the head dimension, shared a:1 between value and query/key, as
    factor pairs share their parameters (the value side capped at the head dimension). Query/key
    dimensions come in RoPE pairs."""
    refusal = head_dims_refusal(config)
    if refusal:
        raise LorapError(refusal)
    dim = head_dim(config)
    multiple = head_dim_multiple(align)
    kept = 2 * dim * (1 - attention_ratio)
    v = min(dim, kept * allocation_a / (1 + allocation_a))
    qk = min(dim, kept - v)
    v = min(dim, kept - qk)
    qk_step = max(2, multiple)
    qk = int(math.floor(qk / qk_step + 0.5)) * qk_step
    v = int(math.floor(v / multiple + 0.5)) * multiple
    if qk < 2 or v < 1:
        raise LorapError(
            f"removing {attention_ratio:.0%} of each layer's attention leaves heads of dimension {dim} no "
            f"query/key pair or value dimension" + (f" in multiples of {multiple}" if multiple > 1 else "")
            + "; use a smaller --ratio, --mode exact, or --align 1")
    return min(qk, dim), min(v, dim)


def most_removable_head_dim_ratio(config, settings: PlanSettings) -> float:
    """The largest attention ratio at which every head still keeps a query/key pair and a value dimension."""
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        try:
            kept_head_dims(config, mid, settings.allocation_a, settings.align)
            low = mid
        except LorapError:
            high = mid
    return low


def most_removable_head_ratio(config) -> float:
    """The largest attention ratio that still keeps one KV group in every layer."""
    return 1 - 0.5 / kv_groups(config) - 1e-6


def kv_groups(config) -> int:
    """KV heads per layer of the dense model, each serving a group of query heads."""
    return attention_shapes(config)["k_proj"][0] // head_dim(config)


def _layer_plan(index, ranks, width, settings: PlanSettings, dense_width: int, ffn_bias: bool,
                kv_heads: int | None = None, heads_per_group: int = 1, o_bias_added: bool = False) -> LayerPlan:
    """A layer's plan from what it keeps. Its many parameters are LayerPlan's fields, passed through, and
    what decides whether the down projection gains a bias: a model without FFN biases gains one where
    removed channels are compensated."""
    added = FFN_UPDATES[settings.ffn_update].adds_bias and width < dense_width and not ffn_bias
    heads = None if kv_heads is None else kv_heads * heads_per_group
    return LayerPlan(index, dict(ranks), width, added, kv_heads, heads, o_bias_added)


def make_plan(config, settings: PlanSettings) -> Plan:
    """Reference mode: `ratio` per layer. Exact mode: the per-layer ratio that removes `ratio` of the whole model.

    With `settings.align` "auto", the default alignment of this device (alignment.py): the largest of
    its candidates for this model that meets the budget, and the device's limit on factor pairs
    that run faster than dense; the plan's settings record both as used."""
    settings.validate()
    if settings.removes_layers:
        return layer_removal_plan(config, settings)
    if settings.align == AUTO_ALIGN:
        return _plan_with_default_alignment(config, settings)
    if settings.mode == "reference":
        plan = plan_with_layer_ratio(config, settings, settings.ratio)
        if plan.removed_fraction <= 0:  # a coarse --align can round every shape back to dense
            raise LorapError(
                f"at ratio {settings.ratio} nothing would be removed: every rank and FFN width of this model rounds "
                f"back to its dense size at --align {settings.align}; use a smaller --align or a larger --ratio"
            )
    else:
        plan = _exact_plan(config, settings)
    _refuse_whole_heads(config, plan)
    return plan


def _refuse_whole_heads(config, plan: Plan) -> None:
    """--attention headdim where every layer's heads round back to whole: the budget would fall on the FFN
    alone, which the user did not ask for (with --align auto, the next finer multiple is tried instead)."""
    settings = plan.settings
    if settings.attention != "headdim" or "attention" not in settings.sublayers:
        return
    if any(layer.qk_head_dim is not None for layer in plan.layers):
        return
    dim = head_dim(config)
    multiple = head_dim_multiple(settings.align)
    rounding = f", kept in multiples of {multiple} (--align {settings.align})," if multiple > 1 else ""
    raise LorapError(
        f"--attention headdim would narrow no head: at ratio {settings.ratio}, heads of dimension {dim}{rounding} "
        "keep every dimension in every layer, so only the FFN would lose parameters. Use "
        + ("--align 1, " if multiple > 1 else "") + "a larger --ratio, or --attention lowrank"
    )


def _plan_with_default_alignment(config, settings: PlanSettings) -> Plan:
    candidates = default_alignments(config)
    for align in candidates:
        try:
            return make_plan(config, replace(settings, align=align, pair_limit=alignment.device_kind()))
        except LorapError:
            if align == candidates[-1]:
                raise


def _exact_plan(config, settings: PlanSettings) -> Plan:
    target = settings.ratio
    limit = 1 - settings.bottom_keep - 1e-9
    if settings.attention == "heads" and "attention" in settings.sublayers:  # every layer keeps a KV group
        limit = min(limit, most_removable_head_ratio(config) / settings.attention_scale)
    if settings.attention == "headdim" and "attention" in settings.sublayers:  # every head keeps a pair and a value
        limit = min(limit, most_removable_head_dim_ratio(config, settings) / settings.attention_scale)

    def plan_at(r):
        return plan_with_layer_ratio(config, settings, r)

    most = plan_at(limit)
    if most.removed_fraction < target - EXACT_TOLERANCE:
        raise LorapError(
            f"at most {most.removed_fraction:.1%} of this model's parameters can be removed from its "
            f"{'/'.join(settings.sublayers)} sublayers (embeddings, norms and LM head are untouched); "
            f"{target:.1%} was asked for"
        )
    # The removed fraction grows with the layer ratio (in steps, from integer ranks and widths):
    # bisect, then keep the candidate closest to the target.
    low, high = 0.0, limit
    best = most
    for _ in range(60):
        mid = (low + high) / 2
        candidate = plan_at(mid)
        if abs(candidate.removed_fraction - target) < abs(best.removed_fraction - target):
            best = candidate
        if candidate.removed_fraction < target:
            low = mid
        else:
            high = mid
    if (abs(best.removed_fraction - target) > EXACT_TOLERANCE and settings.align > 1 and "ffn" in settings.sublayers
            and settings.ffn == "channels"):
        best = _closest_with_blocks_moved(best, target, settings.align)
    if abs(best.removed_fraction - target) > EXACT_TOLERANCE:
        raise LorapError(
            f"could not reach {target:.2%} removed within {EXACT_TOLERANCE:.1%} "
            f"(closest: {best.removed_fraction:.2%}); the model's matrices are too coarse for this target"
            + (" at this --align" if settings.align > 1 else "")
        )
    return best


def _closest_with_blocks_moved(plan: Plan, target: float, align: int) -> Plan:
    """With aligned shapes one uniform step can be coarser than the tolerance: narrow (or widen) the
    FFN of k layers, spread evenly over the depth, by one block of `align` channels, for the k that
    lands closest to the target."""
    n_layers = len(plan.layers)
    width = plan.layers[0].ffn_width
    best = plan
    for step in (-align, align):
        if not align <= width + step <= plan.intermediate_size:
            continue
        for k in range(1, n_layers + 1):
            moved = {int((j + 0.5) * n_layers / k) for j in range(k)}
            candidate = plan.with_ffn_widths([width + step if i in moved else width for i in range(n_layers)])
            if abs(candidate.removed_fraction - target) < abs(best.removed_fraction - target):
                best = candidate
    return best


# ---------------------------------------------------------------- whole layers removed (ShortGPT)


def layer_removal_plan(config, settings: PlanSettings) -> Plan:
    """Whole decoder layers removed, the others dense: as many as the ratio asks, to the nearest layer.

    Reference mode: `ratio` of the decoder layers; exact mode: the count whose removal comes closest to
    `ratio` of the whole model's parameters (the plan's totals say the share it removes). Which layers
    go is the calibration data's choice (methods/layer_importance.py: the lowest Block Influence); until
    a run has measured it, the plan marks the deepest layers before the last as placeholders. A budget
    below half a layer's share, or one that would leave no layer, is refused."""
    settings = replace(settings, align=1, pair_limit="none")  # nothing is factorized or narrowed
    dense = plan_with_layer_ratio(config, replace(settings, sublayers=()), 0.0)
    count_layers = len(dense.layers)
    per_layer = dense.layer_norms + sum(row["dense_parameters"] for row in dense.rows if row["layer"] == 0)
    if settings.mode == "reference":
        share, of = 1 / count_layers, "of its decoder layers"
    else:
        share, of = per_layer / dense.dense_parameters, "of its parameters"
    count = math.floor(settings.ratio / share + 0.5)
    if count < 1:
        raise LorapError(
            f"removing whole layers: one of this model's {count_layers} decoder layers is {share:.2%} {of}, and "
            f"{settings.ratio:.2%} asked is less than half of that; ask for at least {share / 2:.2%}, or compress "
            "within the layers (another preset)")
    if count >= count_layers:
        raise LorapError(f"removing {settings.ratio:.0%} {of} would remove every one of this model's {count_layers} "
                         "decoder layers; ask for less")
    placeholders = range(count_layers - 1 - count, count_layers - 1)
    plan = replace(dense.with_removed_layers(placeholders), settings=settings)
    return replace(plan, layer_ratio=settings.ratio if settings.mode == "reference" else count / count_layers)
