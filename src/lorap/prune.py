"""FFN channel pruning: score intermediate channels, drop whole channels, optionally compensate.

Channel criteria (higher score = more important), registered by name; each sees the FFN and
what the calibration inputs of gate/up/down looked like (`calibration.ProjectionInputs`):

  lorap           the paper: ||(|W_up| s_up)[c,:]|| + ||(|W_gate| s_gate)[c,:]|| + ||(|W_down| s_down)[:,c]||
  magnitude       weights only: ||W_up[c,:]|| + ||W_gate[c,:]|| + ||W_down[:,c]||
  wanda-sp        structured Wanda (An et al., FLAP paper): sum_i |W_down[i,c]| * ||x_c||
  flap            FLAP's fluctuation: Var(x_c) over tokens * ||W_down[:,c]||^2
  llm-pruner-l2   LLM-Pruner's group L2: sum of the squared weights of row c of gate and up and column c of down
  llm-pruner-taylor  LLM-Pruner's first-order Taylor: sum over the same weights of |w * dL/dw| (gradients.py)

What happens to the removed channels' contribution (`update`):
  none    dropped (the paper)
  bias    their mean output is folded into the down projection's bias (FLAP's compensation)
  lstsq   the kept columns of down are refitted by least squares to the dense output, and the
          mean remainder goes into the bias (uses the Gram matrix of the down projection's inputs)
"""
import torch
from torch import nn

from .choices import FFN_SCORES, FFN_UPDATES
from .errors import LorapError

# Relative ridge on the kept channels' covariance in the least-squares refit (as SparseGPT's
# 1% dampening): keeps the solve well posed when kept channels are nearly collinear.
LSTSQ_DAMPING = 0.01


def _weights(linear) -> torch.Tensor:
    return linear.weight.detach().float()


def lorap_scores(mlp, inputs: dict) -> torch.Tensor:
    def weighted(linear, statistic, dim):
        weight = _weights(linear)
        return (weight.abs() * statistic.to(weight.device, torch.float32)[None, :]).norm(dim=dim)

    return (
        weighted(mlp.up_proj, inputs["up_proj"].norm, 1)
        + weighted(mlp.gate_proj, inputs["gate_proj"].norm, 1)
        + weighted(mlp.down_proj, inputs["down_proj"].norm, 0)
    )


def magnitude_scores(mlp, inputs: dict) -> torch.Tensor:
    return _weights(mlp.up_proj).norm(dim=1) + _weights(mlp.gate_proj).norm(dim=1) + _weights(mlp.down_proj).norm(dim=0)


def llm_pruner_l2_scores(mlp, inputs: dict) -> torch.Tensor:
    return _weights(mlp.up_proj).pow(2).sum(1) + _weights(mlp.gate_proj).pow(2).sum(1) + _weights(mlp.down_proj).pow(2).sum(0)


def wanda_sp_scores(mlp, inputs: dict) -> torch.Tensor:
    down = _weights(mlp.down_proj)
    return (down.abs() * inputs["down_proj"].norm.to(down.device, torch.float32)[None, :]).sum(0)


def flap_scores(mlp, inputs: dict) -> torch.Tensor:
    down = _weights(mlp.down_proj)
    return inputs["down_proj"].variance.to(down.device, torch.float32) * down.pow(2).sum(0)


CHANNEL_SCORERS = {
    "lorap": lorap_scores,
    "magnitude": magnitude_scores,
    "wanda-sp": wanda_sp_scores,
    "flap": flap_scores,
    "llm-pruner-l2": llm_pruner_l2_scores,
    "llm-pruner-taylor": None,  # needs gradients of the whole model: computed before the walk (gradients.py)
}
PRECOMPUTED_SCORERS = {"llm-pruner-taylor"}
assert tuple(CHANNEL_SCORERS) == FFN_SCORES


def channel_scores(mlp, statistics: dict, method: str = "lorap") -> torch.Tensor:
    """Scores of every intermediate channel. `statistics` maps gate_proj / up_proj / down_proj to
    their ProjectionInputs (or, for the paper's criterion, to the channel norms alone)."""
    from .calibration import ProjectionInputs

    inputs = {n: (ProjectionInputs.from_norm(v) if isinstance(v, torch.Tensor) else v) for n, v in statistics.items()}
    return CHANNEL_SCORERS[method](mlp, inputs)


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


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int, bias: bool = False) -> nn.Linear:
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


def _compensation(down: nn.Linear, keep: torch.Tensor, update: str, down_inputs) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(change to the kept columns of down or None, change to its bias), in float64."""
    width = down.in_features
    dropped = torch.ones(width, dtype=torch.bool)
    dropped[keep.cpu()] = False
    weight = down.weight.detach().double().cpu()
    mean = down_inputs.mean.double().cpu()
    kept_mask = ~dropped
    if update == "bias":
        return None, weight[:, dropped] @ mean[dropped]
    if down_inputs.gram is None:
        raise LorapError("the least-squares FFN update needs the Gram matrix of the down projection's inputs")
    tokens = down_inputs.tokens
    covariance = down_inputs.gram.double().cpu() / tokens - torch.outer(mean, mean)
    kk = covariance[kept_mask][:, kept_mask]
    kd = covariance[kept_mask][:, dropped]
    ridge = LSTSQ_DAMPING * kk.diagonal().mean().clamp_min(1e-12)
    kk = kk + ridge * torch.eye(kk.shape[0], dtype=kk.dtype)
    # delta = W_D C_DK (C_KK + ridge)^-1: the dropped channels' output regressed on the kept ones.
    delta = torch.linalg.solve(kk, kd @ weight[:, dropped].T).T
    bias_change = weight[:, dropped] @ mean[dropped] - delta @ mean[kept_mask]
    return delta, bias_change


def prune_ffn(mlp, keep: torch.Tensor, update: str = "none", down_inputs=None) -> None:
    """Remove every channel not in `keep`: rows of gate and up, columns of down.

    With update 'bias' or 'lstsq' the removed channels' contribution is compensated (module
    docstring); the down projection gains a bias if it had none.
    """
    if update not in FFN_UPDATES:
        raise LorapError(f"FFN update must be one of {', '.join(FFN_UPDATES)}, got {update!r}")
    compensate = update != "none" and keep.numel() < mlp.down_proj.in_features
    if compensate:
        delta, bias_change = _compensation(mlp.down_proj, keep, update, down_inputs)
    mlp.gate_proj = _slice_linear(mlp.gate_proj, keep, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, keep, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, keep, 1, bias=compensate)
    mlp.intermediate_size = keep.numel()
    if compensate:
        down = mlp.down_proj
        with torch.no_grad():
            if delta is not None:
                down.weight.add_(delta.to(down.weight.device, down.weight.dtype))
            down.bias.add_(bias_change.to(down.bias.device, down.bias.dtype))
