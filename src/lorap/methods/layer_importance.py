"""How much each decoder layer changes the residual stream, and budgets spread over layers by it.

Block Influence (ShortGPT, arXiv 2403.03853) of layer l is 1 - the mean cosine similarity, over
the calibration tokens, between the layer's input and its output hidden states: a layer that
barely turns the stream matters little. MoDeGPT (arXiv 2408.09632) spreads its compression over
layers by it: layer l loses phi_l = L * phi * softmax(-BI / temperature)_l of its parameters
(the average phi), capped, so the layers that change the stream least lose most. ShortGPT itself
removes the layers of lowest Block Influence whole (`prepare_layer_removal`).
"""
from dataclasses import replace

import torch

from ..errors import LorapError
from ..log import info

# MoDeGPT's temperature and cap. The paper's own values could not be confirmed from its text; these are
# the ones its public reimplementations use (0.05 to 0.15; 0.8).
ALLOCATION_TEMPERATURE = 0.1
MOST_REMOVED_PER_LAYER = 0.8


class BlockInfluence:
    """A dense walk's visitor (PreparedRun.dense_walk) measuring each layer's Block Influence: it hooks
    each layer before the walk runs it on its calibration inputs (walk.process_layer), so the hook sees
    every input and output once, in memory or streamed alike."""

    def __init__(self):
        self.similarity, self.tokens, self._handle = [], [], None

    def __call__(self, index, layer, stats) -> None:
        self.close()  # the layer's pass is done

    def before(self, index, layer) -> None:
        self.close()
        self.similarity.append(0.0)
        self.tokens.append(0)

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(hidden.double(), out.double(), dim=-1)
            self.similarity[index] += float(cosine.sum())
            self.tokens[index] += cosine.numel()

        self._handle = layer.register_forward_hook(hook, with_kwargs=True)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def scores(self) -> list:
        return [1 - total / max(count, 1) for total, count in zip(self.similarity, self.tokens)]


def block_influence(run) -> list:
    """[Block Influence of each decoder layer] of the run's dense model (run: pipeline.run.PreparedRun)."""
    visitor = BlockInfluence()
    try:
        run.dense_walk(visitor, desc="scoring layers")
    finally:
        visitor.close()
    return visitor.scores()


def softmax_allocation(scores: list, average: float, temperature: float = ALLOCATION_TEMPERATURE,
                       cap: float = MOST_REMOVED_PER_LAYER) -> list:
    """Per-layer shares removed, averaging `average`: L * average * softmax(-score / temperature), each at
    most `cap`, what a capped layer cannot take spread over the others in proportion."""
    weights = torch.softmax(-torch.tensor(scores, dtype=torch.float64) / temperature, 0) * len(scores)
    shares = weights * average
    capped = torch.zeros_like(shares, dtype=torch.bool)
    for _ in range(len(scores)):
        over = (shares > cap) & ~capped
        if not over.any():
            break
        capped |= over
        excess = float((shares[capped] - cap).sum())
        shares[capped] = cap
        free = ~capped
        if not free.any():
            break
        shares[free] += excess * weights[free] / weights[free].sum()
    return shares.clamp(0, cap).tolist()


def prepare_block_influence_allocation(run) -> None:
    """The registered whole-model pass of `--layer-allocation block-influence`: run.plan gets per-layer
    ratios spread by Block Influence, removing what the uniform plan removes."""
    from ..plan.plan import plan_with_layer_ratios

    plan, settings = run.plan, run.plan.settings
    scores = block_influence(run)
    target = plan.dense_parameters - plan.compressed_parameters
    config = run.source.model_config
    low, high = 0.0, MOST_REMOVED_PER_LAYER
    best = None
    for _ in range(40):  # the average share whose allocation removes the uniform plan's parameters
        average = (low + high) / 2
        try:
            candidate = plan_with_layer_ratios(config, settings, softmax_allocation(scores, average))
        except LorapError:
            high = average
            continue
        removed = candidate.dense_parameters - candidate.compressed_parameters
        if best is None or abs(removed - target) < abs(best.dense_parameters - best.compressed_parameters - target):
            best = candidate
        low, high = (average, high) if removed < target else (low, average)
    if best is None:
        raise LorapError("no per-layer allocation by Block Influence meets this budget; use --layer-allocation uniform")
    ratios = [round(ratio, 3) for ratio in softmax_allocation(scores, (low + high) / 2)]
    info(f"layer allocation by Block Influence: {min(ratios):.1%} to {max(ratios):.1%} removed per layer")
    run.plan = replace(best, layer_ratio=plan.layer_ratio)  # the share asked of every layer on average


def lowest_influence(scores: list, count: int) -> list:
    """The `count` layers of lowest Block Influence, in layer order (a tie goes to the earlier layer)."""
    return sorted(sorted(range(len(scores)), key=lambda index: (scores[index], index))[:count])


def prepare_layer_removal(run) -> None:
    """The registered whole-model pass of `--layer-allocation remove-layers` (ShortGPT, arXiv 2403.03853):
    as many layers as the plan removes (plan.plan.layer_removal_plan), those of lowest Block Influence
    in the dense model, measured in one walk."""
    plan = run.plan
    scores = block_influence(run)
    removed = lowest_influence(scores, len(plan.removed_layers))
    run.plan = plan.with_removed_layers(removed)
    info(f"removing {len(removed)} of {len(scores)} layers by Block Influence: {removed} "
         f"(BI {', '.join(f'{scores[index]:.4f}' for index in removed)}; lowest kept "
         f"{min(score for index, score in enumerate(scores) if index not in removed):.4f}); "
         f"{run.plan.removed_fraction:.2%} of the parameters")
