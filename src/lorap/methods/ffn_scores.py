"""FFN channel criteria: one score per intermediate channel (higher = more important).

Each takes the FFN (anything with gate_proj, up_proj and down_proj linears: the architecture
adapter's view) and what the calibration inputs of gate/up/down looked like
(`pipeline.statistics.ProjectionInputs`); each is registered in registry.FFN_SCORES.

  lorap           the paper: ||(|W_up| s_up)[c,:]|| + ||(|W_gate| s_gate)[c,:]|| + ||(|W_down| s_down)[:,c]||
  magnitude       weights only: ||W_up[c,:]|| + ||W_gate[c,:]|| + ||W_down[:,c]||
  wanda-sp        structured Wanda (An et al., FLAP paper): sum_i |W_down[i,c]| * ||x_c||
  flap            FLAP's fluctuation: Var(x_c) over tokens * ||W_down[:,c]||^2
  llm-pruner-l2   LLM-Pruner's group L2: sum of the squared weights of row c of gate and up and column c of down
  llm-pruner-taylor  LLM-Pruner's first-order Taylor (taylor.py: a whole-model pass before the walk)
  nystrom         MoDeGPT's ridge leverage scores of the down projection's input correlation C:
                  diag(C (C + lambda I)^-1), lambda = NYSTROM_RIDGE x the mean of diag(C)
"""
import torch


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


# MoDeGPT's ridge, relative to the channels' mean second moment (the paper's absolute value depends on
# how C is normalised, so it is stated relative to C here)
NYSTROM_RIDGE = 1e-2


def nystrom_scores(mlp, inputs: dict) -> torch.Tensor:
    """How much of each channel the others cannot express (its ridge leverage), as MoDeGPT keeps the
    channels a Nystrom approximation of the FFN needs most: 1 - lambda diag((C + lambda I)^-1)."""
    down = inputs["down_proj"]
    if down.gram is None:
        raise ValueError("the nystrom criterion needs the Gram matrix of the down projection's input")
    second = down.gram.double().cpu() / max(down.tokens, 1)
    ridge = NYSTROM_RIDGE * float(second.diagonal().mean().clamp_min(1e-300))
    second.diagonal().add_(ridge)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(second))
    return (1 - ridge * inverse.diagonal()).float()


def channel_scores(mlp, statistics: dict, method: str = "lorap", options: dict | None = None) -> torch.Tensor:
    """Scores of every intermediate channel. `statistics` maps gate_proj / up_proj / down_proj to
    their ProjectionInputs (or, for the paper's criterion, to the channel norms alone); `options`: the
    criterion's keyword arguments (CompressionConfig.options_of)."""
    from ..pipeline.statistics import ProjectionInputs
    from .registry import FFN_SCORES

    inputs = {n: (ProjectionInputs.from_norm(v) if isinstance(v, torch.Tensor) else v) for n, v in statistics.items()}
    return FFN_SCORES[method].function()(mlp, inputs, **(options or {}))
