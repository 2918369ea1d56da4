"""AWSVD and plain SVD: exactness at full rank, optimality of the weighted error, shapes, bias."""
import torch

from lorap.factorize import ZERO_STATISTIC_EPSILON, awsvd, factorized_linear, plain_svd


def _weight_and_inputs(out_features=48, in_features=32, tokens=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    # Inputs with very unequal channel scales, as in real LLM activations (outlier channels).
    scales = torch.logspace(-1, 1, in_features)
    inputs = torch.randn(tokens, in_features, generator=generator) * scales
    statistic = inputs.pow(2).sum(0).sqrt()
    return weight, inputs, statistic


def test_full_rank_reconstructs_the_weight():
    weight, _, statistic = _weight_and_inputs()
    for method in (awsvd, plain_svd):
        left, right = method(weight.double(), statistic.double(), min(weight.shape))
        assert torch.allclose(left @ right, weight.double(), atol=1e-9)


def test_factor_shapes():
    weight, _, statistic = _weight_and_inputs()
    left, right = awsvd(weight, statistic, 7)
    assert left.shape == (48, 7) and right.shape == (7, 32)


def test_awsvd_output_error_is_at_most_plain_svd():
    weight, inputs, statistic = _weight_and_inputs()
    reference = inputs @ weight.T
    for rank in (2, 4, 8, 16, 24):
        errors = {}
        for method in (awsvd, plain_svd):
            left, right = method(weight.double(), statistic.double(), rank)
            errors[method.__name__] = ((inputs.double() @ (left @ right).T) - reference.double()).norm()
        # Weighting by the channel norms is optimal for the diagonal of the input covariance;
        # on these (nearly independent) channels it must not lose to plain SVD.
        assert errors["awsvd"] <= errors["plain_svd"] * 1.0001, rank


def test_awsvd_is_optimal_in_the_weighted_norm():
    weight, _, statistic = _weight_and_inputs()
    d = torch.diag(statistic.double())
    rank = 8
    left, right = awsvd(weight.double(), statistic.double(), rank)
    error = ((weight.double() - left @ right) @ d).norm()
    singular = torch.linalg.svdvals(weight.double() @ d)
    # Eckart-Young: the error in the weighted norm is exactly the discarded singular values.
    assert torch.isclose(error, singular[rank:].pow(2).sum().sqrt(), rtol=1e-9)


def test_zero_statistic_is_replaced_by_epsilon():
    weight, _, statistic = _weight_and_inputs()
    statistic[3] = 0
    left, right = awsvd(weight.double(), statistic.double(), 32)
    assert torch.isfinite(right).all()
    assert torch.allclose(left @ right, weight.double(), atol=1e-6 / ZERO_STATISTIC_EPSILON)


def test_a_rank_that_would_grow_the_matrix_is_refused():
    import pytest

    from lorap.errors import LorapError

    linear = torch.nn.Linear(32, 48)
    with pytest.raises(LorapError, match="bigger"):
        factorized_linear(linear, torch.ones(32), rank=20)  # 20 * (32 + 48) = 1600 > 32 * 48 = 1536
    assert factorized_linear(linear, torch.ones(32), rank=19).rank == 19


def test_factorized_linear_keeps_bias_on_the_outer_factor_and_dtype():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48, bias=True).to(torch.bfloat16)
    statistic = torch.rand(32) + 0.5
    pair = factorized_linear(linear, statistic, rank=19)
    assert pair.right.bias is None and pair.left.bias is not None
    assert pair.left.weight.dtype == torch.bfloat16 and pair.right.weight.dtype == torch.bfloat16
    assert torch.equal(pair.left.bias, linear.bias)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    assert pair(x).shape == linear(x).shape
