"""Head-dimension narrowing (`--attention headdim`): every head stays, with fewer dimensions.

Why: a factor pair is two matrix products where there was one, saves little at low ratios, and
leaves the KV cache as it was. Narrowing each head's dimensions keeps every projection a plain
dense matrix, only smaller, and the cache shrinks with the keys and values. The two halves of
attention are narrowed apart, as MoDeGPT (arXiv 2408.09632) does:

- Query/key (what QK^T reads): RoPE rotates dimension i of a head together with dimension
  i + head_dim/2, by a frequency of its own, so the only linear changes that commute with it act
  within such a pair. So whole pairs are kept or dropped, each keeping its own frequency. A pair's
  share of a score q . k is at most the product of its query and key norms, so under GQA a KV
  group's pair j scores sqrt(E|k_j|^2) times the sum over the group's query heads of
  sqrt(E|q_hj|^2) (expectations over the calibration inputs: the whitened column norms), and each
  group keeps its highest pairs. The kept rows of q and k are copied as they are.
- Value/output (what the head adds to the residual): per KV group, the map from the layer input
  to the output through v and the group's query heads' columns of o_proj is x -> W_o V(x). With
  R^T R = E[v v^T] (the values' second moment, through the calibration inputs), truncating the SVD
  of R W_o^T to k singular vectors U_k is the best rank-k change of the value basis for that
  map: the new v rows are U_k^T R^-T W_v and each query head's o columns W_o,h R^T U_k, and the
  squared error on the calibration inputs is the sum of the dropped singular values squared.
  Attention mixes values across tokens by weights that sum to one, so the basis change commutes
  with it (and a value bias passes through).

The registered criteria (registry.HEAD_DIM_SCORES) differ only in the second moment of the
attention input they use: the calibration inputs' (whitened) or the identity (plain).

The basis is chosen from the values token by token; o_proj reads them after attention has mixed
them. The `lstsq` update (registry.HEAD_DIM_UPDATES) refits o_proj to that input instead: with
z the dense o_proj input over the calibration tokens and T the block-diagonal change of basis
(each query head's group's U_k^T R^-T), the narrowed input is T z, and the new o_proj is
(W_o G T^T + ridge B) (T G T^T + ridge)^-1 with G = E[z z^T] and B the columns the basis gives:
the least-squares fit of the dense output (uncentred, so o_proj needs no bias), pulled toward B.
It takes T z for the narrowed input, as if the kept query/key pairs left the attention weights as
they were.
"""
from dataclasses import dataclass, replace

import torch
from torch import nn

from .factorizations import whitening_factor
from .ffn_pruning import slice_linear
from .head_pruning import HeadLayout
from .registry import LSTSQ_RIDGE, WHITENING_SHRINK


@dataclass
class InputMoments:
    """E[x x^T] and E[x] of the attention's input (float64), what both halves are chosen by. The value
    basis reads the second moment shrunk toward its diagonal by `value_shrink` (for_values)."""

    second: torch.Tensor
    mean: torch.Tensor
    value_shrink: float = 0.0

    def for_values(self) -> "InputMoments":
        if not self.value_shrink:
            return self
        diagonal = torch.diag(self.second.diagonal())
        return InputMoments((1 - self.value_shrink) * self.second + self.value_shrink * diagonal, self.mean)


def whitened_moments(inputs, whitening_shrink: float = WHITENING_SHRINK.default) -> InputMoments:
    """The calibration inputs' moments (the Gram matrix and mean the layer walk collected). The value
    basis is chosen from the second moment shrunk toward its diagonal by `whitening_shrink`, as factor
    pairs' whitening is: the channel correlations of the calibration text fit it more than other text.
    The query/key pairs are scored by the moment as it is: shrinking it there too lost on both
    validation corpora with attention alone (docs/records/benchmarks.md, attention-methods, says so)."""
    if inputs.gram is None:
        raise ValueError("head-dimension narrowing needs the Gram matrix of the attention's input")
    return InputMoments(inputs.gram.double().cpu() / max(inputs.tokens, 1), inputs.mean.double().cpu(), whitening_shrink)


def plain_moments(inputs) -> InputMoments:
    """White inputs: the choices then depend on the weights alone."""
    width = inputs.norm.numel()
    return InputMoments(torch.eye(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))


def input_moments(inputs, method: str, options: dict | None = None) -> InputMoments:
    from .registry import HEAD_DIM_SCORES

    return HEAD_DIM_SCORES[method].function()(inputs, **(options or {}))


def _weight_and_bias(linear) -> tuple:
    weight = linear.weight.detach().double().cpu()
    bias = None if linear.bias is None else linear.bias.detach().double().cpu()
    return weight, bias


def output_second_moments(linear, moments: InputMoments) -> torch.Tensor:
    """E[y_r^2] of each output row r of y = W x + b."""
    weight, bias = _weight_and_bias(linear)
    moments_ = ((weight @ moments.second) * weight).sum(1)
    if bias is not None:
        moments_ = moments_ + 2 * bias * (weight @ moments.mean) + bias * bias
    return moments_.clamp_min(0)


def pair_scores(attention, moments: InputMoments, layout: HeadLayout) -> torch.Tensor:
    """[kv_heads, head_dim / 2]: each KV group's score of each RoPE pair (module docstring)."""
    half = layout.head_dim // 2

    def pair_norms(linear, heads):
        per_dim = output_second_moments(linear, moments).reshape(heads, layout.head_dim)
        return (per_dim[:, :half] + per_dim[:, half:]).sqrt()

    queries = pair_norms(attention.q_proj, layout.kv_heads * layout.heads_per_group)
    keys = pair_norms(attention.k_proj, layout.kv_heads)
    return keys * queries.reshape(layout.kv_heads, layout.heads_per_group, half).sum(1)


def kept_rope_index(scores: torch.Tensor, qk_head_dim: int) -> torch.Tensor:
    """[kv_heads, qk_head_dim]: each group's kept dimensions, its highest pairs' first dimensions in
    ascending order, then their partners (the order the narrowed q and k rows take)."""
    half = scores.shape[1]
    order = torch.argsort(-scores, dim=1, stable=True)[:, : qk_head_dim // 2]
    kept = order.sort(dim=1).values
    return torch.cat([kept, kept + half], dim=1)


def value_second_moment(weight, bias, moments: InputMoments) -> torch.Tensor:
    """E[v v^T] of v = W x + b."""
    second = weight @ moments.second @ weight.T
    if bias is not None:
        cross = torch.outer(weight @ moments.mean, bias)
        second = second + cross + cross.T + torch.outer(bias, bias)
    return second


@dataclass
class ValueBasis:
    """One KV group's reduced value basis: new v rows = to_values @ W_v (and bias), new o columns of each
    of its query heads = W_o,h @ from_values; `singular_values` of the whitened value-to-output map."""

    to_values: torch.Tensor  # [kept, head_dim]
    from_values: torch.Tensor  # [head_dim, kept]
    singular_values: torch.Tensor


def value_basis(v_weight, v_bias, o_columns: list, moments: InputMoments, kept: int) -> ValueBasis:
    """The best `kept`-dimensional value basis of one KV group (module docstring). `o_columns`: the
    o_proj columns [hidden, head_dim] of each of the group's query heads."""
    lower = whitening_factor(value_second_moment(v_weight, v_bias, moments))  # L L^T = E[v v^T]; R = L^T
    mapped = lower.T @ torch.cat([columns.T for columns in o_columns], dim=1)  # R W_o^T: [head_dim, heads x hidden]
    u, singular_values, _ = torch.linalg.svd(mapped, full_matrices=False)
    u_kept = u[:, :kept]
    # U_k^T R^-T = U_k^T L^-1 = (L^-T U_k)^T
    to_values = torch.linalg.solve_triangular(lower.T, u_kept, upper=True).T
    return ValueBasis(to_values, lower @ u_kept, singular_values)


def refit_output(o_weight: torch.Tensor, basis_weight: torch.Tensor, to_values: torch.Tensor, o_inputs,
                 lstsq_ridge: float = LSTSQ_RIDGE.default) -> torch.Tensor:
    """o_proj's new weight [hidden, heads x kept] for narrowed values (module docstring), float64.
    `o_weight`: the dense o_proj weight; `basis_weight`: the columns the value basis gives, which the
    ridge pulls toward (a large ridge keeps them); `to_values`: [heads x kept, heads x head_dim], the
    block-diagonal change of basis; `o_inputs`: the statistics of o_proj's dense input, its Gram
    matrix included. The ridge is relative to the narrowed inputs' mean second moment."""
    if o_inputs.gram is None:
        raise ValueError("the least-squares o_proj update needs the Gram matrix of o_proj's input")
    second = o_inputs.gram.double().cpu() / max(o_inputs.tokens, 1)
    narrowed = to_values @ second @ to_values.T
    ridge = lstsq_ridge * narrowed.diagonal().mean().clamp_min(1e-12)
    narrowed.diagonal().add_(ridge)
    # E[y z'^T] (the dense output against the narrowed input), plus the pull toward the basis columns
    cross = o_weight @ second @ to_values.T + ridge * basis_weight
    return torch.linalg.solve(narrowed, cross.T).T


def _linear_from(weight, bias, like) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=like.weight.device,
                       dtype=like.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@dataclass
class NarrowedAttention:
    """A layer's narrowed projections, the kept RoPE dimensions of each KV group, and what was dropped:
    the share of the pair scores and of the whitened value-to-output energy."""

    projections: dict  # {q_proj, k_proj, v_proj, o_proj: nn.Linear}
    rope_index: torch.Tensor  # [kv_heads, qk_head_dim]
    to_values: torch.Tensor  # [heads x v_head_dim, heads x head_dim]: each query head's change of value basis
    dropped_pair_score: float
    dropped_value_energy: float


def narrow_head_dims(attention, inputs, layout: HeadLayout, qk_head_dim: int, v_head_dim: int,
                     method: str = "whitened", options: dict | None = None) -> NarrowedAttention:
    """New q, k, v and o linears keeping `qk_head_dim` query/key and `v_head_dim` value dimensions per
    head (`attention`: the layer's logical projections; it is left as it is; `inputs`: the statistics of
    its input). o_proj's columns follow the value basis; `updated` may refit them."""
    moments = input_moments(inputs, method, options)
    dim, per_group = layout.head_dim, layout.heads_per_group
    scores = pair_scores(attention, moments, layout)
    rope_index = kept_rope_index(scores, qk_head_dim)
    kept_scores = scores.gather(1, rope_index[:, : qk_head_dim // 2])
    heads = torch.arange(layout.kv_heads * per_group)
    query_rows = (heads[:, None] * dim + rope_index.repeat_interleave(per_group, 0)).flatten()
    key_rows = (torch.arange(layout.kv_heads)[:, None] * dim + rope_index).flatten()

    value_moments = moments.for_values()
    v_weight, v_bias = _weight_and_bias(attention.v_proj)
    o_weight = attention.o_proj.weight.detach().double().cpu()
    v_rows, v_biases, o_columns, to_values, dropped, total = [], [], [], [], 0.0, 0.0
    for group in range(layout.kv_heads):
        rows = slice(group * dim, (group + 1) * dim)
        heads_of_group = range(group * per_group, (group + 1) * per_group)
        columns = [o_weight[:, head * dim : (head + 1) * dim] for head in heads_of_group]
        basis = value_basis(v_weight[rows], None if v_bias is None else v_bias[rows], columns, value_moments, v_head_dim)
        v_rows.append(basis.to_values @ v_weight[rows])
        if v_bias is not None:
            v_biases.append(basis.to_values @ v_bias[rows])
        o_columns += [column @ basis.from_values for column in columns]
        to_values += [basis.to_values] * per_group
        energy = basis.singular_values.pow(2)
        dropped, total = dropped + float(energy[v_head_dim:].sum()), total + float(energy.sum())
    o_proj = attention.o_proj
    o_bias = None if o_proj.bias is None else o_proj.bias.detach()
    return NarrowedAttention(
        projections={
            "q_proj": slice_linear(attention.q_proj, query_rows, 0),
            "k_proj": slice_linear(attention.k_proj, key_rows, 0),
            "v_proj": _linear_from(torch.cat(v_rows), torch.cat(v_biases) if v_biases else None, attention.v_proj),
            "o_proj": _linear_from(torch.cat(o_columns, dim=1), o_bias, o_proj),
        },
        rope_index=rope_index,
        to_values=torch.block_diag(*to_values),
        dropped_pair_score=float(1 - kept_scores.sum() / scores.sum().clamp_min(1e-300)),
        dropped_value_energy=dropped / max(total, 1e-300),
    )


def updated(narrowed: NarrowedAttention, dense_o_proj, update: str, o_inputs=None, options: dict | None = None):
    """`narrowed` with o_proj as the head-dimension update `update` (registry.HEAD_DIM_UPDATES) makes it
    from the dense o_proj and the statistics of its input, `o_inputs`; unchanged for `none`."""
    from .registry import HEAD_DIM_UPDATES

    spec = HEAD_DIM_UPDATES[update]
    if spec.implementation is None:
        return narrowed
    narrowed_o_proj = narrowed.projections["o_proj"]
    weight = spec.function()(dense_o_proj.weight.detach().double().cpu(), narrowed_o_proj.weight.detach().double().cpu(),
                             narrowed.to_values, o_inputs, **(options or {}))
    bias = None if narrowed_o_proj.bias is None else narrowed_o_proj.bias.detach()
    return replace(narrowed, projections={**narrowed.projections, "o_proj": _linear_from(weight, bias, narrowed_o_proj)})
