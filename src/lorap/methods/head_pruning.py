"""Head pruning: whole KV groups removed from a layer's attention, each with its query heads.

Why whole groups: under grouped-query attention one KV head serves a group of query heads.
Removing a whole group shrinks the KV cache (what long contexts pay for) and leaves every
remaining group its size, so the attention code of each supported family runs the narrowed layer
as it is: it reads the head count from the projections' widths (`view(..., -1, head_dim)`) and the
group size from the config, which stays right. Removing query heads inside groups would leave the
KV cache as it was and need the same number removed from every group. Without GQA every query
head is its own group, so this is per-head pruning.

Removing group g deletes its query heads' rows of q_proj, its rows of k_proj and v_proj (with
their biases), and the matching input columns of o_proj. A criterion scores every query channel
(a row of q_proj and its column of o_proj; k and v rows are shared out evenly over the query
channels they serve), and a group's score is the sum over its channels (higher = more important).
The criteria read the weights and the statistics at o_proj's input, where the heads' outputs
meet; each is registered in registry.HEAD_SCORES:

  flap           FLAP's fluctuation: Var(x_c) * ||W_o[:, c]||^2
  wanda-sp       structured Wanda: sum_i |W_o[i, c]| * ||x_c||
  llm-pruner-l2  LLM-Pruner's group L2: the squared weights of the channel's q row, o column, k and v rows
  magnitude      the norms of the channel's q row and o column, and of its k and v rows
  llm-pruner-taylor  LLM-Pruner's first-order Taylor sum |w * dL/dw| over the same weights (taylor.py:
                 a whole-model pass before the walk)

What replaces the removed heads' output is a registered update (registry.HEAD_UPDATES): the FFN
updates' functions applied to o_proj (FLAP's bias compensation, or the least-squares refit).
"""
from dataclasses import dataclass

import torch

from .ffn_pruning import keep_input_columns, slice_linear


@dataclass(frozen=True)
class HeadLayout:
    """How a layer's attention rows are grouped: kv_heads groups of heads_per_group query heads."""

    kv_heads: int
    heads_per_group: int
    head_dim: int

    @classmethod
    def of(cls, plan) -> "HeadLayout":
        """The dense layout of a plan's model (plan.Plan)."""
        return cls(plan.kv_heads, plan.heads // plan.kv_heads, plan.head_dim)

    def query_channels(self, groups: torch.Tensor) -> torch.Tensor:
        """Rows of q_proj (and input columns of o_proj) of these groups' query heads, in order."""
        width = self.heads_per_group * self.head_dim
        return (groups[:, None] * width + torch.arange(width)[None, :]).flatten()

    def kv_channels(self, groups: torch.Tensor) -> torch.Tensor:
        """Rows of k_proj and v_proj of these groups' KV heads, in order."""
        return (groups[:, None] * self.head_dim + torch.arange(self.head_dim)[None, :]).flatten()

    def per_group(self, per_query_channel: torch.Tensor) -> torch.Tensor:
        """Sum of a per-channel quantity over each group's query channels."""
        return per_query_channel.reshape(self.kv_heads, -1).sum(1)


def _weight(linear) -> torch.Tensor:
    return linear.weight.detach().float().cpu()


def flap_head_scores(attention, o_inputs, layout: HeadLayout) -> torch.Tensor:
    return o_inputs.variance.float().cpu() * _weight(attention.o_proj).pow(2).sum(0)


def wanda_sp_head_scores(attention, o_inputs, layout: HeadLayout) -> torch.Tensor:
    return _weight(attention.o_proj).abs().sum(0) * o_inputs.norm.float().cpu()


def per_query_channel(q, k, v, o, layout: HeadLayout) -> torch.Tensor:
    """Per-row values of q, k and v and per-column values of o combined per query channel: its q row
    plus its o column plus an even share of the k and v rows at its position in its group."""
    shared = (k + v).reshape(layout.kv_heads, 1, layout.head_dim).expand(-1, layout.heads_per_group, -1)
    return q + o + shared.flatten() / layout.heads_per_group


def _of_weights(attention, layout: HeadLayout, of_rows) -> torch.Tensor:
    """per_query_channel of `of_rows` (a weight -> one value per row) of each projection's weight."""
    q, k, v = (of_rows(_weight(linear)) for linear in (attention.q_proj, attention.k_proj, attention.v_proj))
    return per_query_channel(q, k, v, of_rows(_weight(attention.o_proj).T), layout)


def l2_head_scores(attention, o_inputs, layout: HeadLayout) -> torch.Tensor:
    return _of_weights(attention, layout, lambda weight: weight.pow(2).sum(1))


def magnitude_head_scores(attention, o_inputs, layout: HeadLayout) -> torch.Tensor:
    return _of_weights(attention, layout, lambda weight: weight.norm(dim=1))


def head_channel_scores(attention, o_inputs, layout: HeadLayout, method: str, options: dict | None = None) -> torch.Tensor:
    """One score per query channel (heads x head_dim) by the registered criterion `method` (`options`: its
    keyword arguments, CompressionConfig.options_of)."""
    from .registry import HEAD_SCORES

    scores = HEAD_SCORES[method].function()(attention, o_inputs, layout, **(options or {}))
    expected = layout.kv_heads * layout.heads_per_group * layout.head_dim
    if scores.shape != (expected,):
        raise ValueError(f"head criterion {method} gave scores of shape {tuple(scores.shape)}, not ({expected},)")
    return scores


def head_scores(attention, o_inputs, layout: HeadLayout, method: str, options: dict | None = None) -> torch.Tensor:
    """One score per KV group: the sum of its query channels' scores."""
    return layout.per_group(head_channel_scores(attention, o_inputs, layout, method, options))


def kept_groups(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """The `kept` highest-scoring groups, in their original order (ties keep the earlier group)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:kept].sort().values


def prune_heads(attention, keep: torch.Tensor, layout: HeadLayout, update: str = "none", o_inputs=None,
                options=None) -> dict:
    """{q_proj, k_proj, v_proj, o_proj: new linears} keeping only the KV groups in `keep` (and their
    query heads); `attention` is left as it is. The removed heads' output is compensated in o_proj
    by the registered head update."""
    from .registry import HEAD_UPDATES

    query, kv = layout.query_channels(keep), layout.kv_channels(keep)
    return {
        "q_proj": slice_linear(attention.q_proj, query, 0),
        "k_proj": slice_linear(attention.k_proj, kv, 0),
        "v_proj": slice_linear(attention.v_proj, kv, 0),
        "o_proj": keep_input_columns(attention.o_proj, query, HEAD_UPDATES[update], o_inputs, options),
    }
