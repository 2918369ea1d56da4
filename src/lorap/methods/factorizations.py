"""Low-rank factorizations of attention projections, registered by name.

Each takes a weight W [out, in], what the calibration inputs of that projection looked like
(`pipeline.statistics.ProjectionInputs`) and a rank k, and returns factors (left [out, k], right
[k, in]) with W ~ left @ right. They run in float32 or wider whatever the model's dtype.

  svd     truncated SVD of W alone (the inputs are ignored)
  asvd    ASVD (Yuan et al. 2023): SVD of W S, S = diag(mean |x_j|)^0.5, S undone on the right
  awsvd   LoRAP's activation-weighted SVD: SVD of W diag(||x_j||), undone on the right
  svdllm  SVD-LLM (Wang et al. 2024) whitening: SVD of W L with L L^T = sum x x^T (Cholesky),
          so that truncating singular values is exactly minimising ||W X - W' X||_F on the
          calibration inputs; `whitening_shrink` s whitens by (1 - s) sum x x^T + s diag(sum x x^T)
          instead, which at 1 is awsvd's scaling (up to a constant)
"""
import torch

from ..errors import LorapError
from ..modeling_lorap import LowRankLinear
from ..pipeline.statistics import ProjectionInputs
from ..plan.counting import factorization_saves
from .registry import WHITENING_SHRINK

# The authors replace zero statistics (dead input channels) by this before dividing by them.
ZERO_STATISTIC_EPSILON = 1e-4
ASVD_ALPHA = 0.5  # ASVD's default exponent of the activation scale
# Relative diagonal damping added to a Gram matrix that is not positive definite (dead or
# collinear input channels), grown tenfold until the Cholesky factorisation succeeds.
WHITENING_DAMPING = 1e-6


def _top_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of `matrix`, the singular values split evenly (sqrt) between them."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.full_like(scale, ZERO_STATISTIC_EPSILON), scale)


def _diagonal_scaled(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate W diag(scale), then undo diag(scale) on the right factor."""
    scale = _nonzero(scale)
    left, right = _top_factors(weight * scale[None, :], rank)
    return left, right / scale[None, :]


def _awsvd_scale(weight: torch.Tensor, inputs: ProjectionInputs) -> torch.Tensor:
    return inputs.norm.to(weight)


def _asvd_scale(weight: torch.Tensor, inputs: ProjectionInputs) -> torch.Tensor:
    if inputs.mean_abs is None:
        raise LorapError("asvd needs the mean absolute input of each channel (collected by the layer walk)")
    return inputs.mean_abs.to(weight).pow(ASVD_ALPHA)


def awsvd(weight: torch.Tensor, inputs: ProjectionInputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-weighted SVD: minimises the error on inputs whose channel norms are ||x_j||."""
    return _diagonal_scaled(weight, _awsvd_scale(weight, inputs), rank)


def asvd(weight: torch.Tensor, inputs: ProjectionInputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: the scale is the mean absolute activation per channel, raised to ASVD_ALPHA."""
    return _diagonal_scaled(weight, _asvd_scale(weight, inputs), rank)


def plain_svd(weight: torch.Tensor, inputs: ProjectionInputs, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the weight alone: the ablation baseline."""
    return _top_factors(weight, rank)


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with L L^T = gram (+ the smallest damping that makes it positive definite)."""
    gram = gram.double()
    scale = gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    damping = 0.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + damping * scale * eye)
        if int(info) == 0:
            return factor
        damping = WHITENING_DAMPING if damping == 0 else damping * 10
    raise LorapError("the input Gram matrix is not positive definite even with damping; calibrate on more tokens")


def shrunk_gram(gram: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) gram + shrink diag(gram): the cross-channel correlations the calibration text showed,
    trusted less. At 1 the whitening factor is diag(||x_j||), AWSVD's scaling."""
    if shrink == 0:
        return gram
    shrunk = gram * (1 - shrink)  # the one [in, in] temporary
    shrunk.diagonal().add_(gram.diagonal(), alpha=shrink)
    return shrunk


def _input_whitening(weight: torch.Tensor, inputs: ProjectionInputs, shrink: float = 0.0) -> torch.Tensor:
    if inputs.gram is None:
        raise LorapError("svdllm needs the Gram matrix of the projection's inputs (collected by the layer walk)")
    return whitening_factor(shrunk_gram(inputs.gram.to(weight.device), shrink))


def svdllm(weight: torch.Tensor, inputs: ProjectionInputs, rank: int,
           whitening_shrink: float = WHITENING_SHRINK.default) -> tuple:
    """SVD-LLM's truncation-aware whitening: SVD of W L, then right = sqrt(S_k) V_k^T L^-1
    (L of the Gram matrix shrunk toward its diagonal by `whitening_shrink`)."""
    factor = _input_whitening(weight, inputs, whitening_shrink)
    left, whitened_right = _top_factors(weight.double() @ factor, rank)
    right = torch.linalg.solve_triangular(factor, whitened_right, upper=False, left=False)
    return left.to(weight.dtype), right.to(weight.dtype)


def truncated_matrix(weight: torch.Tensor, inputs: ProjectionInputs, method: str, options=None) -> torch.Tensor:
    """The matrix whose singular values `method` truncates (W, W diag(scale), or W L): its i-th
    singular value squared is what dropping rank i costs in the error the method minimises.
    `options`: the method's keyword arguments (CompressionConfig.options_of)."""
    if method == "svd":
        return weight
    if method == "svdllm":
        return weight.double() @ _input_whitening(weight, inputs, (options or {}).get(WHITENING_SHRINK.name, WHITENING_SHRINK.default))
    scale = _asvd_scale(weight, inputs) if method == "asvd" else _awsvd_scale(weight, inputs)
    return weight * _nonzero(scale)[None, :]


def factorized_linear(linear: torch.nn.Linear, inputs, rank: int, method: str = "awsvd", compute_dtype=torch.float32,
                      options=None) -> LowRankLinear:
    """A LowRankLinear replacing `linear`, in the linear's own dtype and device.

    `inputs` is a ProjectionInputs, or just the paper's statistic (a tensor) for awsvd and svd;
    `options` the method's keyword arguments (CompressionConfig.options_of).
    """
    if not factorization_saves(linear.in_features, linear.out_features, rank):
        raise LorapError(
            f"rank {rank} would make a {linear.out_features}x{linear.in_features} matrix bigger, not smaller; "
            "keep it dense (ranks must satisfy rank * (in + out) < in * out)"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = ProjectionInputs.from_norm(inputs)
    weight = linear.weight.detach().to(compute_dtype)
    from .registry import FACTORIZATIONS

    left, right = FACTORIZATIONS[method].function()(weight, inputs, rank, **(options or {}))
    pair = LowRankLinear.shaped_like(linear, rank)
    with torch.no_grad():
        pair.left.weight.copy_(left.to(linear.weight.dtype))
        pair.right.weight.copy_(right.to(linear.weight.dtype))
        if linear.bias is not None:
            pair.left.bias.copy_(linear.bias)
    return pair
