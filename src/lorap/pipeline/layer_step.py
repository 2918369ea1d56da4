"""The per-layer step of the walk: factorize attention projections (or remove heads), remove FFN channels
(or factorize the FFN's projections, --ffn lowrank).

With the paper's settings this is LoRAP (AWSVD, the paper's channel score, nothing compensated);
the config chooses the registered alternatives. Projections are read and replaced through the
architecture adapter, so the step never names a module of a particular family.
"""
import torch

from ..architectures import Architecture
from ..families import ATTENTION_PROJECTIONS, FFN_PROJECTIONS
from ..errors import LorapError
from ..methods.factorizations import factorized_linear
from ..methods.ffn_pruning import kept_channels, prune_ffn
from ..methods.ffn_scores import channel_scores
from ..methods.head_dims import narrow_head_dims, updated
from ..methods.head_pruning import HeadLayout, head_scores, kept_groups, prune_heads
from ..methods.registry import FFN_SCORES, HEAD_SCORES
from ..plan.plan import Plan
from .config import CompressionConfig


class ProjectionsView:
    """Logical projections of a layer as attributes, linears (row views where the family fuses them)."""

    names = ATTENTION_PROJECTIONS + FFN_PROJECTIONS

    def __init__(self, architecture: Architecture, layer):
        for name in self.names:
            setattr(self, name, architecture.projection(layer, name))


class FfnView(ProjectionsView):
    """The FFN's three logical projections."""

    names = FFN_PROJECTIONS


class AttentionView(ProjectionsView):
    """Attention's four logical projections."""

    names = ATTENTION_PROJECTIONS


class LayerCompressor:
    """Compress one decoder layer in place, given its input statistics.

    `channel_scores` are per-layer FFN scores, and `head_scores` per-layer query-channel scores,
    computed by a whole-model pass before the walk (a registered criterion with no per-layer
    function, such as LLM-Pruner's Taylor scores).
    `gram_sources` tells the walk which input Gram matrices to collect (only the methods that
    read them pay for them).
    """

    def __init__(self, config: CompressionConfig, plan: Plan, architecture: Architecture, channel_scores: list | None = None,
                 head_scores: list | None = None):
        self.config, self.plan, self.architecture, self.channel_scores = config, plan, architecture, channel_scores
        self.head_scores = head_scores
        self.svd_dtype = getattr(torch, config.svd_dtype)
        if FFN_SCORES[config.ffn_score].implementation is None and channel_scores is None and "ffn" in config.sublayers:
            raise LorapError(f"the {config.ffn_score} criterion needs scores computed before the layer walk")
        if (HEAD_SCORES[config.head_score].implementation is None and head_scores is None
                and config.attention == "heads" and "attention" in config.sublayers):
            raise LorapError(f"the {config.head_score} head criterion needs scores computed before the layer walk")
        self.gram_sources = config.gram_sources()
        # Layers the walk leaves alone (walk.process_layer: no statistics, no forward pass): when whole
        # layers are removed, every layer, as the kept ones stay as they are and the removed ones go
        # (the run drops them after the walk; a streamed one writes only the kept ones).
        self.removed_layers = frozenset(plan.removed_layers)
        self.skipped_layers = frozenset(range(len(plan.layers))) if plan.settings.removes_layers else frozenset()

    def __call__(self, index, layer, stats) -> None:
        self.compress_attention(index, layer, stats)
        if self.plan.layers[index].ffn_ranks is not None:
            self.factorize(layer, stats, self.plan.layers[index].ffn_ranks)
        else:
            self.compress_ffn(index, layer, stats)

    def compress_attention(self, index, layer, stats) -> None:
        if self.plan.layers[index].kv_heads is not None:
            self.prune_heads(index, layer, stats)
            return
        if self.plan.layers[index].qk_head_dim is not None:
            self.narrow_head_dims(index, layer, stats)
            return
        self.factorize(layer, stats, self.plan.layers[index].ranks)

    def factorize(self, layer, stats, ranks: dict) -> None:
        """Replace each projection of `ranks` ({name: rank, or None: it stays dense}) by a factor pair of
        the config's factorization. Every pair is computed from the dense projections before any is put in
        place, so the parts of a fused module (Phi-3's gate_up_proj) are read whole; a fused module holding
        a pair becomes a SplitLinear (architectures.py)."""
        factorized = {}
        for name, rank in ranks.items():
            if rank is not None:
                dense = self.architecture.projection(layer, name)
                factorized[name] = factorized_linear(dense, stats.inputs(name), rank, self.config.factorization,
                                                     self.svd_dtype, self.config.options_of("factorization"))
        if factorized:
            self.architecture.replace(layer, factorized)

    def prune_heads(self, index, layer, stats) -> None:
        plan = self.plan
        kept = plan.layers[index].kv_heads
        if kept == plan.kv_heads:
            return
        layout = HeadLayout.of(plan)
        attention = AttentionView(self.architecture, layer)
        o_inputs = stats.inputs("o_proj")
        if self.head_scores is not None:
            scores = layout.per_group(self.head_scores[index])
        else:
            scores = head_scores(attention, o_inputs, layout, self.config.head_score, self.config.options_of("head_score"))
        keep = kept_groups(scores, kept)
        self.architecture.replace(layer, prune_heads(attention, keep, layout, self.config.head_update, o_inputs,
                                                     self.config.options_of("head_update")))

    def narrow_head_dims(self, index, layer, stats) -> None:
        planned = self.plan.layers[index]
        layout = HeadLayout.of(self.plan)
        attention = AttentionView(self.architecture, layer)
        narrowed = narrow_head_dims(attention, stats.inputs("q_proj"), layout, planned.qk_head_dim, planned.v_head_dim,
                                    self.config.head_dim_score, self.config.options_of("head_dim_score"))
        narrowed = updated(narrowed, attention.o_proj, self.config.head_dim_update, stats.inputs("o_proj"),
                           self.config.options_of("head_dim_update"))
        self.architecture.replace(layer, narrowed.projections)
        self.architecture.narrow_attention(layer, planned.qk_head_dim, planned.v_head_dim, narrowed.rope_index)

    def compress_ffn(self, index, layer, stats) -> None:
        ffn = FfnView(self.architecture, layer)
        width = self.plan.layers[index].ffn_width
        if width == ffn.gate_proj.out_features:
            return
        inputs = {name: stats.inputs(name) for name in FFN_PROJECTIONS}
        stats.release_grams()  # the FFN step is the layer's last: its update may free them as it goes
        if self.channel_scores is not None:
            scores = self.channel_scores[index]
        else:
            scores = channel_scores(ffn, inputs, self.config.ffn_score, self.config.options_of("ffn_score"))
        keep = kept_channels(scores, width, self.config.bottom_keep)
        pruned = prune_ffn(ffn, keep, self.config.ffn_update, inputs["down_proj"], self.config.options_of("ffn_update"))
        self.architecture.replace(layer, {name: getattr(pruned, name) for name in FFN_PROJECTIONS})
        module = self.architecture.ffn(layer)
        if hasattr(module, "intermediate_size"):
            module.intermediate_size = keep.numel()
