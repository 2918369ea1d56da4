"""The plan's rules: ranks of factor pairs and kept widths of FFNs, from shapes alone.

`attention_ranks` is LoRAP's a:1 split of attention's kept parameters between {v, o} and {q, k}
(the authors' integer rule on square attention, the same idea on parameter counts for GQA);
`ffn_kept_width` is its channel count per FFN. `share_ranks` is SVD-LLM's rule: every matrix keeps
the same share of its parameters. With an alignment N > 1 ranks and widths become multiples of N,
the shapes GEMM kernels run fastest (`--align`); N = 1 is the paper's exact rule.
"""
import math

from ..families import ATTENTION_PROJECTIONS
from ..errors import LorapError
from .counting import factorization_saves, linear_parameters

MAX_RATIO = 0.9



def reference_square_ranks(d: int, keep: float, a: float) -> dict:
    """The authors' rule for square (multi-head) attention, reproduced exactly, int() and all."""
    k_att = int(keep * d / 2)
    k_max = int(k_att * 2 * a / (1 + a))
    if k_max >= d / 2:
        qk = int(keep * d) - d // 2
        return {"q_proj": qk, "k_proj": qk, "v_proj": None, "o_proj": None}
    k_min = int(k_att * 2 / (1 + a))
    return {"q_proj": k_min, "k_proj": k_min, "v_proj": k_max, "o_proj": k_max}


def no_limit(weights: int) -> float:
    """Any pair smaller than its matrix is used (the paper's rule)."""
    return 1.0


def _group_ranks(shapes: dict, names: tuple, budget: float, limit=no_limit) -> tuple[dict, int]:
    """One shared rank for a group of matrices within `budget` parameters.

    A matrix whose factor pair would not be smaller than itself, or not faster (`limit`: dense
    size -> the largest pair fraction that still runs faster), stays dense; its dense size is paid
    from the budget and the rank of the rest is recomputed.
    """
    dense = set()
    while True:
        factorized = [n for n in names if n not in dense]
        if not factorized:
            break
        left = budget - sum(shapes[n][0] * shapes[n][1] for n in dense)
        rank = max(1, math.floor(left / sum(shapes[n][0] + shapes[n][1] for n in factorized)))
        newly_dense = [n for n in factorized if not _pair_fits(shapes[n], rank, limit)]
        if not newly_dense:
            break
        dense.update(newly_dense)
    ranks = {n: (None if n in dense else rank) for n in names}
    used = sum(linear_parameters(shapes[n][1], shapes[n][0], rank=ranks[n]) for n in names)
    return ranks, used


def attention_ranks(shapes: dict, keep: float, a: float, limit=no_limit) -> dict:
    """Ranks for q, k, v, o keeping a `keep` fraction of attention weights, split a:1 between {v,o} and {q,k}.

    On square attention this is the reference rule; on GQA (k, v not square) the same idea is
    applied to parameter counts, and surplus from a group that stays dense goes to the other.
    `limit` also keeps dense a matrix whose pair would be too large to run faster (alignment.py);
    the square rule leaves that to aligned_ranks.
    """
    square = {shapes[n][:2] for n in ATTENTION_PROJECTIONS}
    if len(square) == 1 and shapes["q_proj"][0] == shapes["q_proj"][1]:
        return reference_square_ranks(shapes["q_proj"][0], keep, a)
    weights = {n: (shapes[n][0], shapes[n][1]) for n in ATTENTION_PROJECTIONS}
    budget = keep * sum(out * inp for out, inp in weights.values())
    vo_ranks, vo_used = _group_ranks(weights, ("v_proj", "o_proj"), budget * a / (1 + a), limit)
    qk_budget = budget - vo_used if None in vo_ranks.values() else budget / (1 + a)
    qk_ranks, qk_used = _group_ranks(weights, ("q_proj", "k_proj"), qk_budget, limit)
    if None in qk_ranks.values() and None not in vo_ranks.values():
        vo_ranks, _ = _group_ranks(weights, ("v_proj", "o_proj"), budget - qk_used, limit)
    return {**qk_ranks, **vo_ranks}


def share_ranks(shapes: dict, keep: float, limit=no_limit) -> dict:
    """SVD-LLM's one truncation ratio: every matrix keeps `keep` of its parameters, its rank
    floor(keep m n / (m + n)) (at least 1). A pair that would not be smaller than its matrix (or not
    faster, by `limit`) stays dense."""
    ranks = {}
    for name, (out_features, in_features, *_) in shapes.items():
        # (the tiny slack: keep m n / (m + n) computed as 15.9999... where it is 16)
        rank = max(1, math.floor(keep * out_features * in_features / (out_features + in_features) + 1e-9))
        ranks[name] = rank if _pair_fits((out_features, in_features), rank, limit) else None
    return ranks


def _pair_fits(shape, rank: int, limit) -> bool:
    out_features, in_features = shape[:2]
    return factorization_saves(in_features, out_features, rank, limit(in_features * out_features))


# ---------------------------------------------------------------- FFN widths


def ffn_removed_channels(width: int, ratio: float) -> int:
    return int(ratio * width)


def ffn_kept_width(width: int, ratio: float, bottom_keep: float, align: int = 1) -> int:
    kept = aligned_width(width - ffn_removed_channels(width, ratio), align, width)
    if int(bottom_keep * width) + width - kept > width:
        raise LorapError(f"bottom-keep {bottom_keep} plus ratio {ratio} exceeds the FFN width {width}")
    return kept


def aligned_width(width: int, align: int, dense_width: int) -> int:
    """The multiple of `align` nearest `width` (at least one block); the dense width stays as it is."""
    if align == 1 or width >= dense_width:
        return width
    return min(dense_width, max(align, round(width / align) * align))


def aligned_ranks(ranks: dict, shapes: dict, align: int, limit=no_limit) -> dict:
    """Each rank to the multiple of `align` nearest it; a pair that would then not be smaller than
    its dense matrix (or larger than `limit` allows) stays dense."""
    if align == 1 and limit is no_limit:
        return ranks
    aligned = {}
    for name, rank in ranks.items():
        if rank is not None:
            rank = max(align, round(rank / align) * align)
            rank = rank if _pair_fits(shapes[name], rank, limit) else None
        aligned[name] = rank
    return aligned
