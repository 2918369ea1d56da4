"""Adaptive ranks (`--rank-allocation adaptive`): a layer's factorized projections share the
layer's kept attention parameters by what each rank is worth, instead of one rank per group.

The plan's a:1 rule gives q and k one rank, and v and o another, from shapes alone. But the
projections' spectra differ: dropping the i-th singular value of the matrix a factorization
truncates (W diag(||x_j||) for AWSVD, W L for SVD-LLM's whitening) costs sigma_i^2 in the error that
factorization minimises, and a rank of projection p costs in_p + out_p parameters. Per layer, the
ranks are chosen greedily by sigma^2 per parameter, a block of `align` ranks at a time, within
the same parameter budget the plan gave that layer's factor pairs (so the whole model's count and
every FFN width are unchanged, and a projection the plan keeps dense stays dense). This is SVD-LLM
V2's idea (per-matrix ranks from truncation loss, arXiv 2503.12340) applied within a layer, where
the errors of the projections are on comparable scales. The singular values come from a scoring
pass over the dense model (streamed: over the shards), as adaptive FFN widths do.
"""
import torch

from ..families import ATTENTION_PROJECTIONS
from ..log import info
from ..plan.counting import factorization_saves
from .factorizations import truncated_matrix


def _largest_rank(shape, limit: float) -> int:
    """The largest rank at which the pair is still smaller (and, by `limit`, faster) than the matrix."""
    out_features, in_features = shape
    rank = (in_features * out_features) // (in_features + out_features)
    while rank > 0 and not factorization_saves(in_features, out_features, rank, limit):
        rank -= 1
    return rank


def layer_ranks(spectra: dict, shapes: dict, budget: int, align: int = 1, limits: dict | None = None) -> dict:
    """Ranks for the projections in `spectra` ({name: singular values, descending}) whose pairs
    together hold at most `budget` weights ({name: (out, in)} shapes), maximising the kept sum of
    squared singular values. Each rank is a positive multiple of `align` and stays below the size
    at which its pair would not be smaller than the matrix (or not faster, by `limits`)."""
    cost = {name: sum(shapes[name]) for name in spectra}
    cap = {name: _largest_rank(shapes[name], (limits or {}).get(name, 1.0)) // align * align for name in spectra}
    ranks = {name: align for name in spectra}  # every pair keeps at least one block
    spent = sum(ranks[name] * cost[name] for name in spectra)
    blocks = []  # (value per weight, name): the value of each further block of `align` ranks
    for name, values in spectra.items():
        energy = values.double().pow(2)
        for start in range(align, cap[name], align):
            gain = float(energy[start : start + align].sum())
            blocks.append((gain / (align * cost[name]), name))
    blocks.sort(key=lambda block: -block[0])
    for _, name in blocks:  # within a projection blocks come in order, as its values descend
        price = align * cost[name]
        if spent + price <= budget:
            ranks[name] += align
            spent += price
    return ranks


class RankScorer:
    """The scoring pass's visitor: every layer's adaptive ranks from its dense projections."""

    def __init__(self, plan, architecture, factorization: str, gram_sources: tuple, limits: dict, options=None):
        self.plan, self.architecture, self.factorization = plan, architecture, factorization
        self.options = options or {}  # the factorization's keyword arguments
        self.gram_sources, self.limits = gram_sources, limits  # gram_sources: read by the walk's statistics
        self.ranks = []

    def __call__(self, index, layer, stats) -> None:
        planned = self.plan.layers[index].ranks
        factorized = [name for name in ATTENTION_PROJECTIONS if planned[name] is not None]
        spectra, shapes = {}, {}
        for name in factorized:
            weight = self.architecture.projection(layer, name).weight.detach().float()
            spectra[name] = torch.linalg.svdvals(truncated_matrix(weight, stats.inputs(name), self.factorization,
                                                                  self.options))
            shapes[name] = tuple(weight.shape)
        budget = sum(planned[name] * sum(shapes[name]) for name in factorized)
        chosen = layer_ranks(spectra, shapes, budget, self.plan.settings.align, self.limits) if factorized else {}
        self.ranks.append({name: chosen.get(name) for name in ATTENTION_PROJECTIONS})


def prepare_adaptive_ranks(run) -> None:
    """The registered whole-model pass: run.plan gets per-layer ranks from the dense spectra."""
    from functools import partial

    from ..plan.alignment import pair_max_fraction

    config, plan = run.config, run.plan
    if "attention" not in config.sublayers:
        return
    settings = plan.settings
    limits = {}
    if settings.pair_limit != "none":
        limit = partial(pair_max_fraction, settings.pair_limit)
        limits = {name: limit(out * inp) for name, (out, inp, _) in plan.attention.items()}
    sources = tuple(name for name in config.gram_sources() if name in ("q_proj", "o_proj"))  # attention's
    scorer = RankScorer(plan, run.source.architecture, config.factorization, sources, limits,
                        config.options_of("factorization"))
    run.dense_walk(scorer, desc="scoring attention spectra")
    changed = sum(scorer.ranks[i] != layer.ranks for i, layer in enumerate(plan.layers))
    info(f"adaptive ranks: {changed} of {len(plan.layers)} layers moved rank between their projections")
    run.plan = plan.with_attention_ranks(scorer.ranks)
