"""Adaptive FFN widths: the plan's total of removed channels, spread over layers by their scores.

FLAP's rule (An et al. 2024, "AL"): every channel's score is standardised within its layer
((score - mean) / std), and the lowest standardised scores of the whole model are removed,
whichever layers they are in. Layers whose channels matter less lose more. The scores are
taken on the dense model (one pass over all layers before any is compressed), as in FLAP; a
streamed run makes that pass over the shards, keeping only the scores.
"""
import torch

from ..architectures import FFN_PROJECTIONS
from ..log import info
from ..plan.ranks import aligned_width
from .ffn_pruning import protected_count
from .ffn_scores import channel_scores

# No layer keeps fewer than this share of its channels, however low its scores.
MIN_KEPT_FRACTION = 0.05


def dense_channel_scores(run, method: str) -> list:
    """Scores of every layer's FFN channels on the unmodified model (run: pipeline.run.PreparedRun)."""
    from ..pipeline.layer_step import FfnView

    architecture = run.source.architecture
    scores = []

    def record(index, layer, stats):
        inputs = {name: stats.inputs(name) for name in FFN_PROJECTIONS}
        scores.append(channel_scores(FfnView(architecture, layer), inputs, method).cpu())

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


def prepare_adaptive_widths(run) -> None:
    """The registered whole-model pass of adaptive allocation: run.plan gets per-layer FFN widths,
    from the criterion's scores on the dense model (or those a whole-model criterion computed)."""
    config, plan = run.config, run.plan
    if "ffn" not in config.sublayers:
        return
    scores = run.channel_scores
    if scores is None:
        scores = dense_channel_scores(run, config.ffn_score)
    removed = sum(plan.intermediate_size - layer.ffn_width for layer in plan.layers)
    widths = aligned_widths(adaptive_widths(scores, removed, config.bottom_keep), plan.settings.align, plan.intermediate_size)
    info(f"adaptive FFN widths: {min(widths)} to {max(widths)} channels kept per layer (uniform: {plan.layers[0].ffn_width})")
    run.plan = plan.with_ffn_widths(widths)
