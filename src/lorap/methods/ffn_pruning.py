"""FFN channel pruning: keep the chosen channels, drop the rest, optionally compensate.

Removing channel c deletes row c of gate and up and column c of down. What happens to the removed
channels' contribution is an FFN update, registered in registry.FFN_UPDATES:

  none    dropped (the paper)
  bias    their mean output is folded into the down projection's bias (FLAP's compensation)
  lstsq   the kept columns of down are refitted by least squares to the dense output, and the
          mean remainder goes into the bias (uses the Gram matrix of the down projection's inputs)

An update takes (down weight in float32 on the CPU, mask of dropped channels, the down
projection's ProjectionInputs) and returns (change to the kept columns of down or None, change
to its bias), both in float64: it computes in float64 on copies of only the columns it needs
(keep_input_columns says why the whole weight is not copied).
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LorapError
from .registry import LSTSQ_RIDGE

COVARIANCE_ROWS_AT_ONCE = 1024


def protected_count(width: int, bottom_keep: float) -> int:
    return int(bottom_keep * width)


def kept_channels(scores: torch.Tensor, kept_width: int, bottom_keep: float) -> torch.Tensor:
    """Channels to keep, in their original order.

    Sorted by score ascending, the lowest `bottom_keep` fraction survives (the paper finds
    these matter), the next `width - kept_width` are removed, and the rest survive.
    """
    width = scores.numel()
    removed = width - kept_width
    protected = protected_count(width, bottom_keep)
    order = torch.argsort(scores, stable=True)
    dropped = order[protected : protected + removed]
    keep = torch.ones(width, dtype=torch.bool, device=scores.device)
    keep[dropped] = False
    return keep.nonzero().flatten()


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int, bias: bool = False) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    with_bias = bias or linear.bias is not None
    sliced = nn.Linear(in_features, out_features, bias=with_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if linear.bias is not None:
            bias_values = linear.bias.detach()
            sliced.bias.copy_(bias_values.index_select(0, index.to(bias_values.device)) if dim == 0 else bias_values)
        elif with_bias:
            sliced.bias.zero_()
    return sliced


def bias_compensation(weight: torch.Tensor, dropped: torch.Tensor, down_inputs) -> tuple:
    mean = down_inputs.mean.double().cpu()
    return None, weight[:, dropped].double() @ mean[dropped]


def least_squares_refit(weight: torch.Tensor, dropped: torch.Tensor, down_inputs, lstsq_ridge: float = LSTSQ_RIDGE.default) -> tuple:
    if down_inputs.gram is None:
        raise LorapError("the least-squares FFN update needs the Gram matrix of the down projection's inputs")
    mean = down_inputs.mean.double().cpu()
    kept_mask = ~dropped
    tokens = down_inputs.tokens
    # Only the kept-kept and kept-dropped blocks of the input covariance are formed (never the whole
    # [width, width] matrix and its temporaries: gigabytes at LLaMA-7B's FFN width), each element
    # computed as gram / tokens - mean_i mean_j, in place.
    kept, removed = kept_mask.nonzero().squeeze(1), dropped.nonzero().squeeze(1)
    gram = down_inputs.take_gram().cpu()  # taken, so that it is freed once the two blocks are read
    kk = _covariance_block(gram, mean, tokens, kept, kept)
    kd = _covariance_block(gram, mean, tokens, kept, removed)
    del gram
    ridge = lstsq_ridge * kk.diagonal().mean().clamp_min(1e-12)
    kk.diagonal().add_(ridge)
    dropped_weight = weight[:, dropped].double()
    # delta = W_D C_DK (C_KK + ridge)^-1: the dropped channels' output regressed on the kept ones.
    right_side = kd @ dropped_weight.T
    del kd
    delta = torch.linalg.solve(kk, right_side).T
    bias_change = dropped_weight @ mean[dropped] - delta @ mean[kept_mask]
    return delta, bias_change


def _covariance_block(gram: torch.Tensor, mean: torch.Tensor, tokens: int, rows: torch.Tensor, columns: torch.Tensor):
    """(gram / tokens - outer(mean, mean))[rows][:, columns], in float64, without the whole matrix."""
    block = torch.empty(rows.numel(), columns.numel(), dtype=torch.float64)
    for start in range(0, rows.numel(), COVARIANCE_ROWS_AT_ONCE):  # bounded temporaries of the row gather
        chunk = rows[start : start + COVARIANCE_ROWS_AT_ONCE]
        block[start : start + chunk.numel()] = gram[chunk][:, columns]
    block.div_(tokens)
    block.sub_(torch.outer(mean[rows], mean[columns]))
    return block


@dataclass
class PrunedFfn:
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


def prune_ffn(mlp, keep: torch.Tensor, update: str = "none", down_inputs=None, options=None) -> PrunedFfn:
    """New gate, up and down linears keeping only the channels in `keep` (`mlp` is left as it is).

    With an update other than 'none' the removed channels' contribution is compensated (module
    docstring); the down projection gains a bias if it had none. `options`: the update's keyword
    arguments (CompressionConfig.options_of).
    """
    from .registry import FFN_UPDATES

    return PrunedFfn(
        slice_linear(mlp.gate_proj, keep, 0),
        slice_linear(mlp.up_proj, keep, 0),
        keep_input_columns(mlp.down_proj, keep, FFN_UPDATES[update], down_inputs, options),
    )


def keep_input_columns(linear: nn.Linear, keep: torch.Tensor, update, inputs=None, options=None) -> nn.Linear:
    """A new linear reading only the input columns `keep` of `linear`, the dropped columns'
    contribution compensated by `update` (a registered update's MethodSpec) from `inputs`, the
    statistics of `linear`'s input; it gains a bias where compensation needs one. FFN pruning uses
    it on down_proj, head pruning on o_proj."""
    compensate = update.implementation is not None and keep.numel() < linear.in_features
    if compensate:
        dropped = torch.ones(linear.in_features, dtype=torch.bool)
        dropped[keep.cpu()] = False
        # float32 (the updates take float64 copies of the dropped columns only: a copy of the whole
        # matrix in float64 is 360 MB at LLaMA-7B's width)
        delta, bias_change = update.function()(linear.weight.detach().float().cpu(), dropped, inputs, **(options or {}))
    sliced = slice_linear(linear, keep, 1, bias=compensate)
    if compensate:
        with torch.no_grad():
            if delta is not None:
                sliced.weight.add_(delta.to(sliced.weight.device, sliced.weight.dtype))
            sliced.bias.add_(bias_change.to(sliced.bias.device, sliced.bias.dtype))
    return sliced
