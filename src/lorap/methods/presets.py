"""Named methods: the paper's LoRAP, lorap's best preset, and the baselines and ablations it is
compared with. Each is a set of CompressionConfig settings; all share the one layer walk.

The baselines as published (Wanda-sp, FLAP, LLM-Pruner) remove attention heads (whole KV groups
with their query heads, methods/head_pruning.py) and FFN channels, each by its own criterion:
Wanda-sp and LLM-Pruner with one ratio for every layer, FLAP with heads and channels allocated
together across layers and the removed ones' mean output folded into biases. LLM-Pruner as
published also leaves its first and last layers whole; here every layer is pruned alike. The
hybrids `*-ffn` apply only their FFN criterion (and FLAP's adaptive widths and compensation) and
compress attention as the paper does (AWSVD ranks, a = 3). SVD-LLM factorizes all seven projections
of every layer at one truncation ratio; ShortGPT removes whole decoder layers.

Shapes: `best` and the pruning baselines, the methods one deploys, round ranks and FFN widths to this
device's multiple (`align="auto"`, plan/alignment.py), which runs faster at the same budget. The
paper's method keeps its exact integers (it reproduces the published ranks and widths), and so do
its ablations and options, which each change exactly one thing from the paper, and SVD-LLM, whose
ranks are its published rule's.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..errors import LorapError
from ..pipeline.config import CompressionConfig
from .registry import part_options
from ..plan.alignment import AUTO_ALIGN

DEPLOYED = dict(align=AUTO_ALIGN)  # shapes that fit the device's kernels
# best's --whitening-shrink: 0.5 beat 0 (SVD-LLM as published) on the two-domain validation mean at
# 20% and at 50% removed (docs/records/benchmarks.md, "Choosing best on validation data"); with
# --attention headdim it shrinks the moments the value basis is chosen by too
BEST_WHITENING_SHRINK = 0.5
# best's --lstsq-ridge by the ratio asked for, chosen on that validation data in exact mode (where the
# ratio is the share of the whole model removed). The less is removed, the less the refit has to make
# up for and the more its fit to the calibration text costs out of domain: at 20% a 100x ridge ranked
# first on the two-domain mean (ahead of 10x and the default); at 35% the default did (10x lost on
# both corpora), and at 50% stronger ridges lost badly. Between the two points the ridge is
# interpolated geometrically (at 27.5%, 0.1: measured ahead of the default on both corpora); outside
# them, the nearer one holds.
BEST_RIDGES = ((0.2, 1.0), (0.35, 0.01))
# best with --attention headdim: as many value as query/key dimensions kept, and o_proj refitted. Of the
# narrowed-head settings measured with best's other parts on the validation split of two domains, this
# ranked first at 20% and at 50% removed, and a = 3 (factor pairs' split) last
# (docs/records/benchmarks.md, "Attention in best, on validation data").
BEST_HEAD_DIMS = dict(allocation_a=1.0, head_dim_update="lstsq")
SERVING_ALIGN = 256  # the FFN width multiple engines need; export/decilm.py takes it from here (ENGINE_MULTIPLE)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # how tables name it
    attention: str  # what happens to attention, in words
    ffn: str  # what happens to the FFN, in words
    settings: dict  # settings that differ from the paper's (CompressionConfig's defaults): fields and part options
    by_ratio: Callable | None = None  # ratio -> further settings that depend on the share removed
    by_attention: dict | None = None  # attention method -> the settings that go with it, when it is asked for


METHODS = {
    m.name: m
    for m in (
        Method("paper", "LoRAP (paper)", "AWSVD, a = 3", "LoRAP score, 1% rule", {}),
        # Chosen by measurement on the default model (docs/records/benchmarks.md): each part helped alone, and
        # the whitening's shrink toward its diagonal and the refit's ridge were chosen on the validation
        # split of two domains (benchmarks/choose_best.py): whitening as published and a weak ridge fit
        # the calibration text and lose out of domain.
        Method("best", "lorap best", "SVD-LLM whitening shrunk halfway to AWSVD, a = 3",
               "fluctuation score, adaptive widths, least-squares refit (ridge by the ratio)",
               dict(factorization="svdllm", whitening_shrink=BEST_WHITENING_SHRINK, ffn_score="flap",
                    ffn_allocation="adaptive", ffn_update="lstsq", bottom_keep=0.0, **DEPLOYED),
               by_ratio=lambda ratio: dict(lstsq_ridge=best_ridge(ratio)),
               by_attention={"headdim": BEST_HEAD_DIMS}),
        # For engines that run no factor pairs (llama.cpp, vLLM): attention stays dense, so nothing is lost
        # when exported, and FFN widths are multiples of 256, which DeciLM's layout states exactly and
        # llama.cpp's k-quants need (their blocks are 256 wide). best's FFN parts otherwise, but the
        # default ridge: best's ridge by ratio was chosen with low-rank attention and not measured here.
        Method("serving", "lorap serving", "dense", "fluctuation score, adaptive widths (multiples of 256), "
               "least-squares refit", dict(sublayers=("ffn",), ffn_score="flap", ffn_allocation="adaptive",
                                           ffn_update="lstsq", bottom_keep=0.0, align=SERVING_ALIGN)),
        Method("svd-magnitude", "plain SVD + magnitude", "plain SVD, a = 3", "weight magnitude",
               dict(factorization="svd", ffn_score="magnitude", bottom_keep=0.0, **DEPLOYED)),
        # MoDeGPT (arXiv 2408.09632) as published: query/key RoPE pairs and value dimensions kept per head
        # in equal numbers, FFN channels by ridge leverage with a least-squares refit of down, and the
        # budget spread over layers by Block Influence (methods/layer_importance.py).
        Method("modegpt", "MoDeGPT", "head dims: whitened RoPE pairs and value basis, equal",
               "ridge leverage (Nystrom), least-squares refit; layers by Block Influence",
               dict(attention="headdim", allocation_a=1.0, ffn_score="nystrom", ffn_update="lstsq",
                    layer_allocation="block-influence", bottom_keep=0.0, **DEPLOYED)),
        # SVD-LLM (arXiv 2403.07378) as published: every projection, attention's and the FFN's, a factor pair
        # truncated after whitening by the Cholesky factor of its input Gram matrix, all at one truncation ratio
        # (each matrix keeps the same share of its parameters), exact integer ranks.
        Method("svd-llm", "SVD-LLM", "SVD-LLM whitening, one truncation ratio", "SVD-LLM whitening, one truncation ratio",
               dict(factorization="svdllm", ffn="lowrank", rank_allocation="share")),
        # ShortGPT (arXiv 2403.03853): whole decoder layers with the lowest Block Influence removed, the rest unchanged.
        Method("shortgpt", "ShortGPT", "whole layers removed (lowest Block Influence)",
               "whole layers removed (lowest Block Influence)", dict(layer_allocation="remove-layers")),
        # SliceGPT (arXiv 2401.15024) as published: the residual stream rotated by each block's PCA and
        # its least-varying directions deleted from every matrix, embeddings included (a job of its own:
        # pipeline/sliced.py). Its ratio is always the share of the whole model.
        Method("slicegpt", "SliceGPT", "input side sliced (PCA of the residual stream)",
               "input side sliced; embeddings and head too", dict(mode="exact")),
        Method("wanda-sp", "Wanda-sp", "heads: Wanda-sp score", "Wanda-sp score",
               dict(attention="heads", head_score="wanda-sp", ffn_score="wanda-sp", bottom_keep=0.0, **DEPLOYED)),
        Method("flap", "FLAP", "heads: fluctuation score, bias compensation",
               "fluctuation score, bias compensation; heads and channels allocated together across layers",
               dict(attention="heads", head_score="flap", head_update="bias", ffn_score="flap",
                    ffn_allocation="adaptive", ffn_update="bias", bottom_keep=0.0, **DEPLOYED)),
        Method("llm-pruner-l2", "LLM-Pruner (L2)", "heads: group L2 of the weights", "group L2 of the weights",
               dict(attention="heads", head_score="llm-pruner-l2", ffn_score="llm-pruner-l2", bottom_keep=0.0,
                    **DEPLOYED)),
        Method("llm-pruner-taylor", "LLM-Pruner (Taylor)", "heads: first-order Taylor, abs(w * grad)",
               "first-order Taylor, abs(w * grad)",
               dict(attention="heads", head_score="llm-pruner-taylor", ffn_score="llm-pruner-taylor", bottom_keep=0.0,
                    **DEPLOYED)),
        # The same FFN criteria with the paper's attention (what lorap compared before it removed heads).
        Method("wanda-sp-ffn", "Wanda-sp FFN, LoRAP attention", "AWSVD, a = 3", "Wanda-sp score",
               dict(ffn_score="wanda-sp", bottom_keep=0.0, **DEPLOYED)),
        Method("flap-ffn", "FLAP FFN, LoRAP attention", "AWSVD, a = 3",
               "fluctuation score, adaptive widths, bias compensation",
               dict(ffn_score="flap", ffn_allocation="adaptive", ffn_update="bias", bottom_keep=0.0, **DEPLOYED)),
        Method("llm-pruner-l2-ffn", "LLM-Pruner (L2) FFN, LoRAP attention", "AWSVD, a = 3", "group L2 of the weights",
               dict(ffn_score="llm-pruner-l2", bottom_keep=0.0, **DEPLOYED)),
        Method("llm-pruner-taylor-ffn", "LLM-Pruner (Taylor) FFN, LoRAP attention", "AWSVD, a = 3",
               "first-order Taylor, abs(w * grad)", dict(ffn_score="llm-pruner-taylor", bottom_keep=0.0, **DEPLOYED)),
        Method("plain-svd", "ablation: plain SVD", "plain SVD, a = 3", "LoRAP score, 1% rule", dict(factorization="svd")),
        Method("asvd", "ablation: ASVD", "ASVD (mean |x|^0.5), a = 3", "LoRAP score, 1% rule", dict(factorization="asvd")),
        Method("svd-llm-attention", "ablation: SVD-LLM whitening of attention", "SVD-LLM whitening, a = 3",
               "LoRAP score, 1% rule", dict(factorization="svdllm")),
        Method("uniform-ranks", "ablation: uniform ranks", "AWSVD, one rank for q, k, v, o (a = 1)", "LoRAP score, 1% rule",
               dict(allocation_a=1.0)),
        Method("no-bottom-keep", "ablation: no 1% rule", "AWSVD, a = 3", "LoRAP score, lowest channels removed too",
               dict(bottom_keep=0.0)),
        Method("attention-only", "ablation: attention only", "AWSVD, a = 3", "dense", dict(sublayers=("attention",))),
        Method("ffn-only", "ablation: FFN only", "dense", "LoRAP score, 1% rule", dict(sublayers=("ffn",))),
        Method("bias", "option: bias compensation", "AWSVD, a = 3", "LoRAP score, 1% rule, bias compensation",
               dict(ffn_update="bias")),
        Method("lstsq", "option: least-squares refit", "AWSVD, a = 3", "LoRAP score, 1% rule, least-squares refit",
               dict(ffn_update="lstsq")),
        Method("adaptive", "option: adaptive widths", "AWSVD, a = 3", "LoRAP score, 1% rule, adaptive widths",
               dict(ffn_allocation="adaptive")),
    )
}
# `lorap compare`'s rows by default: the paper, best, the baselines as published, best's closest
# rival (FLAP's FFN criterion beside LoRAP's attention), so that the default table tests best against
# the strongest row lorap knows (docs/records/benchmarks.md) rather than against a floor like
# svd-magnitude, and the published rivals of other kinds (narrowed heads, every projection a pair,
# whole layers removed, the residual stream sliced).
DEFAULT_COMPARISON = ("paper", "best", "flap", "wanda-sp", "llm-pruner-l2", "llm-pruner-taylor", "flap-ffn",
                      "modegpt", "svd-llm", "shortgpt", "slicegpt")


def best_ridge(ratio: float) -> float:
    """best's --lstsq-ridge at this share removed: BEST_RIDGES, geometric between neighbours."""
    if ratio <= BEST_RIDGES[0][0]:
        return BEST_RIDGES[0][1]
    for (low, light), (high, heavy) in zip(BEST_RIDGES, BEST_RIDGES[1:]):
        if ratio <= high:
            t = (ratio - low) / (high - low)
            ridge = math.exp((1 - t) * math.log(light) + t * math.log(heavy))
            return float(f"{ridge:.6g}")  # so that the recorded setting reads as the number it is
    return BEST_RIDGES[-1][1]


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LorapError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def config_for(name: str = "paper", **overrides) -> CompressionConfig:
    """The settings of method `name`, with those that go with the ratio and the attention method asked for;
    `overrides` (CompressionConfig fields or part options, None = not given) win. The paper's method is
    CompressionConfig's defaults."""
    chosen = method(name)
    fields_ = {f.name for f in fields(CompressionConfig)} - {"options"}
    options = part_options()
    unknown = set(overrides) - fields_ - set(options)
    if unknown:
        raise LorapError(f"unknown settings {sorted(unknown)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    settings = {**chosen.settings, "preset": name}
    if chosen.by_ratio is not None:
        settings.update(chosen.by_ratio(given.get("ratio", CompressionConfig.ratio)))
    settings.update((chosen.by_attention or {}).get(given.get("attention", settings.get("attention")), {}))
    settings.update(given)
    if "sublayers" in settings:
        settings["sublayers"] = tuple(settings["sublayers"])
    settings["options"] = {key: settings.pop(key) for key in list(settings) if key in options}
    return CompressionConfig(**settings)
