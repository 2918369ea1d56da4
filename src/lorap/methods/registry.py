"""The one registry of method parts: every factorization, FFN criterion, FFN update and FFN
allocation, rank allocation, and head criterion and update, with what it needs and what it adds.

This module imports no torch: the CLI builds its choices and help from it before any heavy import.
An implementation is named as "module:function" (imported on first use) or given as the function
itself. The CLI, config validation, the memory estimate, the whole-model passes and the options
table of docs/options.md all read these entries; tests are parametrized over them.

Adding a part is one function plus one entry here (docs/architecture.md has the checklist).
"""
import importlib
from dataclasses import dataclass
from typing import Callable

from ..errors import LorapError
from ..options import Option

# What the layer walk can record at a projection's input (pipeline/statistics.py). The first four
# are per-channel sums, always collected; the Gram matrix costs in x in floats and is collected
# only where a registered part asks for it.
STATISTICS = ("norm", "mean", "mean_abs", "variance", "gram")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    implementation: str | Callable | None  # the per-layer function, or None where `prepare` does the work
    help: str
    statistics: tuple = ()  # what it reads at the inputs of `reads` (STATISTICS)
    reads: tuple = ()  # the logical projections whose inputs it reads
    # A whole-model pass before the layer walk (it sees every layer; a streamed run makes it over the
    # shards first): called with the run (pipeline.run.PreparedRun), it may set run.plan, run.channel_scores
    # or run.head_scores.
    prepare: str | Callable | None = None
    prepare_phase: str | None = None  # the report's name for the time `prepare` took
    # adds parameters: a bias on the output projection it compensates (FFN down, attention o) where it had none
    adds_bias: bool = False
    # its strengths (options.Option): keyword arguments of the per-layer function, each a flag and a
    # setting a checkpoint records
    options: tuple = ()

    def __post_init__(self):
        unknown = set(self.statistics) - set(STATISTICS)
        if unknown:
            raise ValueError(f"{self.name}: unknown statistics {sorted(unknown)}; known: {', '.join(STATISTICS)}")
        if not all(isinstance(option, Option) for option in self.options):
            raise ValueError(f"{self.name}: options are options.Option declarations")

    @property
    def needs_gram(self) -> bool:
        return "gram" in self.statistics

    @property
    def needs_whole_model(self) -> bool:
        return self.prepare is not None

    def function(self) -> Callable:
        return _resolve(self.implementation, self.name)

    def prepare_function(self) -> Callable:
        return _resolve(self.prepare, self.name)


def _resolve(target, name: str) -> Callable:
    if target is None:
        raise LorapError(f"{name} has no implementation of that kind")
    if callable(target):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module, __package__), attribute)


class Registry:
    """The registered parts of one kind, in order (the first is the paper's, where the paper has one)."""

    def __init__(self, kind: str, option: str, specs: list, paper: bool = True, when: str = ""):
        self.kind, self.option = kind, option
        self.when = when  # where the part applies, as help says it (" with --attention heads")
        self._specs = {spec.name: spec for spec in specs}
        self.has_paper = paper  # False: the paper has no such part (it factorizes attention, never removes heads)

    @property
    def default(self) -> str:
        """What a run uses unless told otherwise: the first (the paper's, where the paper has one)."""
        return next(iter(self._specs))

    @property
    def paper(self) -> str | None:
        """The paper's choice (the first), or None where the paper has none."""
        return self.default if self.has_paper else None

    def names(self) -> tuple:
        return tuple(self._specs)

    def __contains__(self, name) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __getitem__(self, name: str) -> MethodSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise LorapError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._specs)}") from None

    def register(self, spec: MethodSpec) -> MethodSpec:
        if spec.name in self._specs:
            raise ValueError(f"{self.kind} {spec.name!r} is registered already")
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        del self._specs[name]

    def help(self) -> str:
        """One line for --help: each name with its summary."""
        return "; ".join(f"{spec.name}: {spec.help}" for spec in self)


WHITENING_SHRINK = Option(
    "whitening_shrink", 0.0,
    "whiten by (1 - S) Gram + S diag(Gram), trusting the calibration text's channel correlations less "
    "(0: SVD-LLM's and MoDeGPT's as published; 1: AWSVD's scaling)",
    valid=lambda shrink: 0 <= shrink <= 1, requirement="in [0, 1] (0: SVD-LLM whitening, 1: AWSVD's scaling)")
# The default ridge is relative to the kept inputs' mean variance, as SparseGPT's 1% dampening: it
# keeps the solve well posed when kept channels are nearly collinear.
LSTSQ_RIDGE = Option(
    "lstsq_ridge", 0.01,
    "the refit's ridge relative to the kept inputs' mean variance; larger fits the calibration text less and "
    "tends to bias compensation",
    valid=lambda ridge: ridge > 0, requirement="positive (it keeps the refit well posed)")

ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_INPUTS = ("gate_proj", "up_proj", "down_proj")

# A factorization reads the inputs of every projection it may factorize: attention's, and the FFN's with
# --ffn lowrank (CompressionConfig.part_projections says which a run factorizes).
FACTORIZATIONS = Registry("factorization", "--factorization", [
    MethodSpec("awsvd", ".factorizations:awsvd", "activation-weighted SVD: SVD of W diag(norm of x_j)",
               statistics=("norm",), reads=ATTENTION_INPUTS + FFN_INPUTS),
    MethodSpec("svd", ".factorizations:plain_svd", "plain truncated SVD of W"),
    MethodSpec("asvd", ".factorizations:asvd", "ASVD scaling: SVD of W diag(mean abs(x_j))^0.5",
               statistics=("mean_abs",), reads=ATTENTION_INPUTS + FFN_INPUTS),
    MethodSpec("svdllm", ".factorizations:svdllm",
               "SVD-LLM whitening by the Cholesky factor of the input Gram matrix (--whitening-shrink moves it "
               "toward awsvd)", statistics=("gram",), reads=ATTENTION_INPUTS + FFN_INPUTS, options=(WHITENING_SHRINK,)),
])

FFN_SCORES = Registry("FFN channel criterion", "--ffn-score", [
    MethodSpec("lorap", ".ffn_scores:lorap_scores", "activation-weighted weight norms of gate, up and down",
               statistics=("norm",), reads=FFN_INPUTS),
    MethodSpec("magnitude", ".ffn_scores:magnitude_scores", "weight norms of gate, up and down"),
    MethodSpec("wanda-sp", ".ffn_scores:wanda_sp_scores", "structured Wanda: abs(W_down) times the input norm",
               statistics=("norm",), reads=("down_proj",)),
    MethodSpec("flap", ".ffn_scores:flap_scores", "FLAP's fluctuation: input variance times squared column norm",
               statistics=("variance",), reads=("down_proj",)),
    MethodSpec("llm-pruner-l2", ".ffn_scores:llm_pruner_l2_scores", "LLM-Pruner's group L2 of the weights"),
    MethodSpec("llm-pruner-taylor", None, "LLM-Pruner's first-order Taylor abs(w * dL/dw), from calibration gradients",
               prepare=".taylor:prepare_taylor_scores", prepare_phase="gradients"),
    MethodSpec("nystrom", ".ffn_scores:nystrom_scores",
               "MoDeGPT's ridge leverage scores of the down projection's input correlation",
               statistics=("gram",), reads=("down_proj",)),
])

FFN_UPDATES = Registry("FFN update", "--ffn-update", [
    MethodSpec("none", None, "removed channels are dropped"),
    MethodSpec("bias", ".ffn_pruning:bias_compensation", "removed channels' mean output folded into a bias",
               statistics=("mean",), reads=("down_proj",), adds_bias=True),
    MethodSpec("lstsq", ".ffn_pruning:least_squares_refit",
               "kept channels of down refitted by ridge least squares to the dense output (--lstsq-ridge; "
               "a large ridge tends to bias)", statistics=("mean", "gram"), reads=("down_proj",), adds_bias=True,
               options=(LSTSQ_RIDGE,)),
])

FFN_ALLOCATIONS = Registry("FFN allocation", "--ffn-allocation", [
    MethodSpec("uniform", None, "every layer keeps the same FFN width"),
    MethodSpec("adaptive", None,
               "the same total removed, spread over layers by channel scores standardised per layer, as FLAP; "
               "with --attention heads, heads and channels in one pool across layers (FLAP's AL-AM)",
               prepare=".allocations:prepare_adaptive_widths", prepare_phase="adaptive_scoring"),
])

# How attention's kept parameters become ranks (factor pairs of the FFN, with --ffn lowrank, always keep
# the FFN's share of each matrix, as `share` does).
RANK_ALLOCATIONS = Registry("rank allocation", "--rank-allocation", [
    MethodSpec("rule", None, "the a:1 rule from shapes: one rank for q and k, one for v and o"),
    MethodSpec("adaptive", None,
               "each layer's pair budget shared by the projections' truncated singular values per parameter",
               prepare=".rank_allocation:prepare_adaptive_ranks", prepare_phase="rank_scoring"),
    MethodSpec("share", None,
               "every factor pair keeps the same share of its matrix's parameters, rank floor(keep m n / (m + n)) "
               "(SVD-LLM's one truncation ratio)"),
])
SHARE_RANKS = "share"

# What happens to attention (--attention): "lowrank" factor pairs (the paper), "heads": whole KV
# groups removed with their query heads (every query head is its own group without GQA), or
# "headdim": every head kept, each with fewer query/key and value dimensions (methods/head_dims.py).
ATTENTION_METHODS = ("lowrank", "heads", "headdim")
# What happens to the FFN (--ffn): "channels": whole intermediate channels removed (the paper), or
# "lowrank": gate, up and down each become a factor pair by the factorization (SVD-LLM's FFN).
FFN_METHODS = ("channels", "lowrank")

# Head pruning (--attention heads) removes whole KV groups with their query heads
# (methods/head_pruning.py). The criteria score a group from its weights and the statistics of the
# output projection's input, where the heads' outputs meet.
HEAD_SCORES = Registry("head criterion", "--head-score", [
    MethodSpec("flap", ".head_pruning:flap_head_scores",
               "FLAP's fluctuation at o_proj's input: variance times squared column norm, summed over a group's channels",
               statistics=("variance",), reads=("o_proj",)),
    MethodSpec("wanda-sp", ".head_pruning:wanda_sp_head_scores",
               "structured Wanda: abs(W_o) times o_proj's input norm, summed over a group's channels",
               statistics=("norm",), reads=("o_proj",)),
    MethodSpec("llm-pruner-l2", ".head_pruning:l2_head_scores",
               "LLM-Pruner's group L2: the squared weights of a group's q, k, v rows and o columns"),
    MethodSpec("magnitude", ".head_pruning:magnitude_head_scores",
               "the norms of a group's q, k, v rows and o columns, summed"),
    MethodSpec("llm-pruner-taylor", None,
               "LLM-Pruner's first-order Taylor abs(w * dL/dw) over a group's weights, from calibration gradients",
               prepare=".taylor:prepare_taylor_scores", prepare_phase="gradients"),
], paper=False, when=" with --attention heads")

# What replaces removed heads' output: the FFN updates' functions, applied to o_proj's kept columns.
HEAD_UPDATES = Registry("head update", "--head-update", [
    MethodSpec("none", None, "removed heads are dropped"),
    MethodSpec("bias", ".ffn_pruning:bias_compensation", "removed heads' mean output folded into o_proj's bias (FLAP)",
               statistics=("mean",), reads=("o_proj",), adds_bias=True),
    MethodSpec("lstsq", ".ffn_pruning:least_squares_refit",
               "kept columns of o_proj refitted by ridge least squares to the dense output (--lstsq-ridge)",
               statistics=("mean", "gram"), reads=("o_proj",), adds_bias=True, options=(LSTSQ_RIDGE,)),
], paper=False, when=" with --attention heads")

# Head-dimension narrowing (--attention headdim) keeps RoPE pairs of query/key dimensions by a score
# and the value dimensions of a reduced basis of each KV group's value-to-output map
# (methods/head_dims.py); the criteria read the Gram matrix of the attention's input.
HEAD_DIM_SCORES = Registry("head-dimension criterion", "--head-dim-score", [
    MethodSpec("whitened", ".head_dims:whitened_moments",
               "MoDeGPT's: query/key pairs by their whitened norms, values by a whitened SVD of each KV group's "
               "value-to-output map (--whitening-shrink: values chosen trusting the input's channel correlations less)",
               statistics=("gram",), reads=("q_proj",), options=(WHITENING_SHRINK,)),
    MethodSpec("plain", ".head_dims:plain_moments",
               "the same choices from the weights alone, as if the inputs were white (an ablation)"),
], paper=False, when=" with --attention headdim")

# What o_proj becomes once the values are narrowed: the columns the value basis gives (MoDeGPT), or
# those refitted to the dense output over o_proj's calibration inputs (methods/head_dims.py).
HEAD_DIM_UPDATES = Registry("head-dimension update", "--head-dim-update", [
    MethodSpec("none", None, "o_proj's columns follow the reduced value basis (MoDeGPT)"),
    MethodSpec("lstsq", ".head_dims:refit_output",
               "o_proj refitted by ridge least squares to the dense output over its calibration inputs "
               "(--lstsq-ridge)", statistics=("gram",), reads=("o_proj",), options=(LSTSQ_RIDGE,)),
], paper=False, when=" with --attention headdim")

# How the budget is spread over layers (before any part spreads it further within its sublayer).
LAYER_ALLOCATIONS = Registry("layer allocation", "--layer-allocation", [
    MethodSpec("uniform", None, "every layer loses the same share (the plan's per-layer ratio)"),
    MethodSpec("block-influence", None,
               "MoDeGPT's: layers that change the residual stream least (Block Influence) lose most, by a softmax",
               prepare=".layer_importance:prepare_block_influence_allocation", prepare_phase="layer_scoring"),
    MethodSpec("remove-layers", None,
               "ShortGPT's: whole decoder layers with the lowest Block Influence removed, as many as the ratio asks "
               "(to the nearest layer); the kept layers stay as they are, so the other parts do not apply",
               prepare=".layer_importance:prepare_layer_removal", prepare_phase="layer_scoring"),
])
LAYER_REMOVAL = "remove-layers"

# The parts of a run, in the order their whole-model passes run (the layer allocation first, scores
# before allocations).
REGISTRIES = {"layer_allocation": LAYER_ALLOCATIONS, "factorization": FACTORIZATIONS, "ffn_score": FFN_SCORES, "ffn_update": FFN_UPDATES,
              "ffn_allocation": FFN_ALLOCATIONS, "rank_allocation": RANK_ALLOCATIONS,
              "head_score": HEAD_SCORES, "head_update": HEAD_UPDATES, "head_dim_score": HEAD_DIM_SCORES,
              "head_dim_update": HEAD_DIM_UPDATES}


def part_options() -> dict:
    """{name: Option} of every registered part, each once (both least-squares refits share one)."""
    found = {}
    for registry in REGISTRIES.values():
        for spec in registry:
            for option in spec.options:
                if found.setdefault(option.name, option) is not option:
                    raise ValueError(f"option {option.name!r} is declared twice, differently ({spec.name})")
    return found


def option_users(name: str) -> list:
    """The choices that read option `name`, as flags: ['--ffn-update lstsq', ...]."""
    return [f"{registry.option} {spec.name}" for registry in REGISTRIES.values() for spec in registry
            if any(option.name == name for option in spec.options)]


def options_table() -> str:
    """The options table of docs/options.md for these registries (tests keep that page equal to it)."""
    lines = ["| option | values (the paper's first) |", "|---|---|"]
    for registry in REGISTRIES.values():
        values = [f"`{spec.name}`" + (" (paper)" if spec.name == registry.paper else "") + f": {spec.help}" for spec in registry]
        lines.append(f"| `{registry.option}` | {'; '.join(values)} |")
    for option in part_options().values():
        users = ", ".join(f"`{user}`" for user in option_users(option.name))
        lines.append(f"| `{option.flag}` | with {users}: {option.help} (default `{option.default:g}`) |")
    return "\n".join(lines)
