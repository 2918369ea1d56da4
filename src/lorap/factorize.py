"""Low-rank factorizations of attention projections, registered by name.

Each takes a weight W [out, in] and the per-channel statistic s of its input [in], and
returns factors (left [out, k], right [k, in]) with W ~ left @ right. They run in float32
or wider whatever the model's dtype.
"""
import torch

from .counting import factorization_saves
from .errors import LorapError
from .modeling_lorap import LowRankLinear

# The authors replace zero statistics (dead input channels) by this before dividing by them.
ZERO_STATISTIC_EPSILON = 1e-4


def _top_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of `matrix`, the singular values split evenly (sqrt) between them."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def awsvd(weight: torch.Tensor, statistic: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-weighted SVD: truncate W diag(s), then undo diag(s) on the right factor.

    This minimises the error on inputs whose channel norms are s, rather than on the weights.
    """
    s = torch.where(statistic == 0, torch.full_like(statistic, ZERO_STATISTIC_EPSILON), statistic)
    left, right = _top_factors(weight * s[None, :], rank)
    return left, right / s[None, :]


def plain_svd(weight: torch.Tensor, statistic: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the weight alone (the statistic is ignored): the ablation baseline."""
    return _top_factors(weight, rank)


FACTORIZERS = {"awsvd": awsvd, "svd": plain_svd}


def factorized_linear(linear: torch.nn.Linear, statistic: torch.Tensor, rank: int, method: str = "awsvd", compute_dtype=torch.float32) -> LowRankLinear:
    """A LowRankLinear replacing `linear`, in the linear's own dtype and device."""
    if not factorization_saves(linear.in_features, linear.out_features, rank):
        raise LorapError(
            f"rank {rank} would make a {linear.out_features}x{linear.in_features} matrix bigger, not smaller; "
            "keep it dense (ranks must satisfy rank * (in + out) < in * out)"
        )
    weight = linear.weight.detach().to(compute_dtype)
    left, right = FACTORIZERS[method](weight, statistic.to(device=weight.device, dtype=compute_dtype), rank)
    pair = LowRankLinear.shaped_like(linear, rank)
    with torch.no_grad():
        pair.left.weight.copy_(left.to(linear.weight.dtype))
        pair.right.weight.copy_(right.to(linear.weight.dtype))
        if linear.bias is not None:
            pair.left.bias.copy_(linear.bias)
    return pair
