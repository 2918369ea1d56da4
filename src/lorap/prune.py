"""FFN channel pruning: score intermediate channels without gradients, drop whole channels."""
import torch
from torch import nn


def channel_scores(mlp, statistics: dict) -> torch.Tensor:
    """I_c = ||(|W_up| s_up)[c,:]|| + ||(|W_gate| s_gate)[c,:]|| + ||(|W_down| s_down)[:,c]||.

    `statistics` maps gate_proj / up_proj / down_proj to the channel norms of their inputs.
    """

    def weighted(linear, statistic, dim):
        weight = linear.weight.detach().float()
        return (weight.abs() * statistic.to(weight.device, torch.float32)[None, :]).norm(dim=dim)

    return (
        weighted(mlp.up_proj, statistics["up_proj"], 1)
        + weighted(mlp.gate_proj, statistics["gate_proj"], 1)
        + weighted(mlp.down_proj, statistics["down_proj"], 0)
    )


def kept_channels(scores: torch.Tensor, kept_width: int, bottom_keep: float) -> torch.Tensor:
    """Channels to keep, in their original order.

    Sorted by score ascending, the lowest `bottom_keep` fraction survives (the paper finds
    these matter), the next `width - kept_width` are removed, and the rest survive.
    """
    width = scores.numel()
    removed = width - kept_width
    protected = int(bottom_keep * width)
    order = torch.argsort(scores, stable=True)
    dropped = order[protected : protected + removed]
    keep = torch.ones(width, dtype=torch.bool, device=scores.device)
    keep[dropped] = False
    return keep.nonzero().flatten()


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    sliced = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            sliced.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    return sliced


def prune_ffn(mlp, keep: torch.Tensor) -> None:
    """Remove every channel not in `keep`: rows of gate and up, columns of down."""
    mlp.gate_proj = _slice_linear(mlp.gate_proj, keep, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, keep, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, keep, 1)
    mlp.intermediate_size = keep.numel()
