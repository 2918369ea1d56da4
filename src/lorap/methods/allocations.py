"""Adaptive FFN widths: the plan's total of removed channels, spread over layers by their scores.

FLAP's rule (An et al. 2024, "AL"): every channel's score is standardised within its layer
((score - mean) / std), and the lowest standardised scores of the whole model are removed,
whichever layers they are in. Layers whose channels matter less lose more. The scores are
taken on the dense model (one pass over all layers before any is compressed), as in FLAP; a
streamed run makes that pass over the shards, keeping only the scores.

With head pruning (`--attention heads`), FLAP's structure across attention and FFN ("AL-AM"):
heads and FFN channels of every layer compete in one pool. Each query channel's head score is
standardised within its layer and a KV group scores the mean of its channels'; FFN channels are
standardised as above. Going up the pool, lowest first, each unit costs the parameters it holds (a
group of heads costs as much as ~100 FFN channels in SmolLM2), and the groups passed before the
budget is spent are removed; the FFN channels then take exactly the rest of the budget, the
lowest standardised first. Every layer keeps at least one group.
"""
import torch

from ..families import FFN_PROJECTIONS
from ..log import info
from ..plan.counting import linear_parameters
from ..plan.ranks import aligned_width
from .ffn_pruning import protected_count
from .ffn_scores import channel_scores

# No layer keeps fewer than this share of its channels, however low its scores.
MIN_KEPT_FRACTION = 0.05


def dense_channel_scores(run, method: str) -> list:
    """Scores of every layer's FFN channels on the unmodified model by criterion `method`, with the run's
    options for it (run: pipeline.run.PreparedRun)."""
    from ..pipeline.layer_step import FfnView

    architecture = run.source.architecture
    scores = []

    def record(index, layer, stats):
        inputs = {name: stats.inputs(name) for name in FFN_PROJECTIONS}
        scores.append(channel_scores(FfnView(architecture, layer), inputs, method, run.config.options_of("ffn_score")).cpu())

    run.dense_walk(record, desc="scoring FFN channels")
    return scores


def adaptive_widths(scores: list, removed_total: int, bottom_keep: float) -> list:
    """Kept width per layer so that `removed_total` channels go in all, lowest standardised first.

    The lowest `bottom_keep` of each layer are protected as in the uniform rule.
    """
    candidates, owners = [], []
    for index, layer_scores in enumerate(scores):
        layer_scores = layer_scores.double()
        width = layer_scores.numel()
        standardised = (layer_scores - layer_scores.mean()) / layer_scores.std().clamp_min(1e-12)
        ordered = torch.sort(standardised).values
        removable = ordered[protected_count(width, bottom_keep) : width - max(1, int(MIN_KEPT_FRACTION * width))]
        candidates.append(removable)
        owners.append(torch.full((removable.numel(),), index, dtype=torch.long))
    pool, owner = torch.cat(candidates), torch.cat(owners)
    if removed_total > pool.numel():
        raise ValueError(f"cannot remove {removed_total} channels; at most {pool.numel()} are removable")
    chosen = owner[torch.argsort(pool, stable=True)[:removed_total]]
    removed = torch.bincount(chosen, minlength=len(scores))
    return [layer_scores.numel() - int(count) for layer_scores, count in zip(scores, removed)]


def aligned_widths(widths: list, align: int, dense_width: int) -> list:
    """Each width a multiple of `align`, the total kept as it was (to within one block): rounded to the
    nearest multiple, then blocks moved to or from the layers that rounding moved furthest."""
    if align == 1:
        return widths
    aligned = [aligned_width(width, align, dense_width) for width in widths]
    while abs(sum(aligned) - sum(widths)) >= align:
        step = -align if sum(aligned) > sum(widths) else align
        movable = [i for i, width in enumerate(aligned) if align <= width + step <= dense_width]
        # the layer whose rounding went furthest against this step
        index = max(movable, key=lambda i: (widths[i] - aligned[i]) * step)
        aligned[index] += step
    return aligned


def _standardised(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.double()
    return (scores - scores.mean()) / scores.std().clamp_min(1e-12)


def dense_layer_scores(run) -> tuple:
    """([each layer's query-channel head scores], [each layer's FFN channel scores or None]) on the dense model."""
    from ..pipeline.layer_step import AttentionView, FfnView
    from .head_pruning import HeadLayout, head_channel_scores

    config, plan = run.config, run.plan
    architecture = run.source.architecture
    layout = HeadLayout.of(plan)
    score_ffn = "ffn" in config.sublayers and run.channel_scores is None
    heads, channels = [], []

    def record(index, layer, stats):
        if run.head_scores is None:
            o_inputs = stats.inputs("o_proj")
            heads.append(head_channel_scores(AttentionView(architecture, layer), o_inputs, layout, config.head_score,
                                             config.options_of("head_score")).cpu())
        if score_ffn:
            inputs = {name: stats.inputs(name) for name in FFN_PROJECTIONS}
            channels.append(channel_scores(FfnView(architecture, layer), inputs, config.ffn_score,
                                           config.options_of("ffn_score")).cpu())

    if run.head_scores is None or score_ffn:
        run.dense_walk(record, desc="scoring heads and FFN channels")
    heads = run.head_scores if run.head_scores is not None else heads
    if "ffn" not in config.sublayers:
        return heads, None
    return heads, run.channel_scores if run.channel_scores is not None else channels


def unit_costs(plan) -> tuple:
    """(parameters of one KV group with its query heads, parameters of one FFN channel)."""
    (_, d, qkv_bias), ffn_bias = plan.attention["q_proj"], plan.ffn_bias
    per_group = plan.heads // plan.kv_heads * plan.head_dim
    group = linear_parameters(d, per_group, qkv_bias) + 2 * linear_parameters(d, plan.head_dim, qkv_bias) + per_group * d
    return group, 2 * linear_parameters(d, 1, ffn_bias) + d


def removed_kv_heads(head_scores: list, ffn_scores: list | None, plan, budget: int, bottom_keep: float) -> list:
    """How many KV groups each layer loses when groups and FFN channels share one pool (module docstring)."""
    groups = plan.kv_heads
    group_cost, channel_cost = unit_costs(plan)
    scores, costs, owners = [], [], []
    for index, channels in enumerate(head_scores):
        group_scores = _standardised(channels).reshape(groups, -1).mean(1)
        # a layer's best group is never offered: every layer keeps one
        offered = torch.sort(group_scores).values[:-1]
        scores.append(offered)
        costs.append(torch.full_like(offered, group_cost))
        owners.append(torch.full((offered.numel(),), index, dtype=torch.long))
    for layer_scores in ffn_scores or []:
        width = layer_scores.numel()
        offered = torch.sort(_standardised(layer_scores)).values
        offered = offered[protected_count(width, bottom_keep) : width - max(1, int(MIN_KEPT_FRACTION * width))]
        scores.append(offered)
        costs.append(torch.full_like(offered, channel_cost))
        owners.append(torch.full((offered.numel(),), -1, dtype=torch.long))  # -1: an FFN channel
    order = torch.argsort(torch.cat(scores), stable=True)
    spent = torch.cumsum(torch.cat(costs)[order], 0)
    passed = order[: int(torch.searchsorted(spent, float(budget))) + 1]  # up to the unit that spends the budget
    owner = torch.cat(owners)[passed]
    return torch.bincount(owner[owner >= 0], minlength=len(head_scores)).tolist()


def prepare_joint_allocation(run) -> None:
    """Adaptive allocation with head pruning: run.plan gets per-layer KV heads and FFN widths (module docstring)."""
    config, plan = run.config, run.plan
    head_scores, ffn_scores = dense_layer_scores(run)
    budget = plan.dense_parameters - plan.compressed_parameters  # what the uniform plan removes
    lost = removed_kv_heads(head_scores, ffn_scores, plan, budget, config.bottom_keep)
    kv_heads = [plan.kv_heads - count for count in lost]
    widths = [plan.intermediate_size] * len(plan.layers)
    count, channel_cost = 0, unit_costs(plan)[1]
    for _ in range(2 if ffn_scores is not None else 0):
        # The FFN channels take the rest of the budget; counted again once, for the biases compensation adds.
        planned = plan.with_heads_and_widths(kv_heads, widths)
        count = max(0, count + round((budget - (planned.dense_parameters - planned.compressed_parameters)) / channel_cost))
        widths = aligned_widths(adaptive_widths(ffn_scores, count, config.bottom_keep), plan.settings.align,
                                plan.intermediate_size)
    info(f"adaptive heads and widths: {min(kv_heads)} to {max(kv_heads)} KV groups kept per layer (uniform: "
         f"{plan.layers[0].kv_heads}), FFN widths {min(widths)} to {max(widths)} (uniform: {plan.layers[0].ffn_width})")
    run.plan = plan.with_heads_and_widths(kv_heads, widths)


def prepare_adaptive_widths(run) -> None:
    """The registered whole-model pass of adaptive allocation: run.plan gets per-layer FFN widths,
    from the criterion's scores on the dense model (or those a whole-model criterion computed);
    with head pruning, per-layer head counts too (prepare_joint_allocation)."""
    config, plan = run.config, run.plan
    if config.attention == "heads" and "attention" in config.sublayers:
        prepare_joint_allocation(run)
        return
    if "ffn" not in config.sublayers:
        return
    scores = run.channel_scores
    if scores is None:
        scores = dense_channel_scores(run, config.ffn_score)
    removed = sum(plan.intermediate_size - layer.ffn_width for layer in plan.layers)
    widths = aligned_widths(adaptive_widths(scores, removed, config.bottom_keep), plan.settings.align, plan.intermediate_size)
    info(f"adaptive FFN widths: {min(widths)} to {max(widths)} channels kept per layer (uniform: {plan.layers[0].ffn_width})")
    run.plan = plan.with_ffn_widths(widths)
