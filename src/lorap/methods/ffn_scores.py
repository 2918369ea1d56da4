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


def channel_scores(mlp, statistics: dict, method: str = "lorap", options: dict | None = None) -> torch.Tensor:
    """Scores of every intermediate channel. `statistics` maps gate_proj / up_proj / down_proj to
    their ProjectionInputs (or, for the paper's criterion, to the channel norms alone); `options`: the
    criterion's keyword arguments (CompressionConfig.options_of)."""
    from ..pipeline.statistics import ProjectionInputs
    from .registry import FFN_SCORES

    inputs = {n: (ProjectionInputs.from_norm(v) if isinstance(v, torch.Tensor) else v) for n, v in statistics.items()}
    return FFN_SCORES[method].function()(mlp, inputs, **(options or {}))
