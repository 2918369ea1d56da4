"""The attention factorizations (AWSVD, plain SVD, ASVD, SVD-LLM whitening): exactness at full
rank, the error each one minimises, shapes, bias."""
import pytest
import torch

from lorap.pipeline.statistics import ProjectionInputs
from lorap.methods.factorizations import (ASVD_ALPHA, ZERO_STATISTIC_EPSILON, asvd, awsvd, factorized_linear, plain_svd, svdllm,
                             whitening_factor)


def _weight_and_inputs(out_features=48, in_features=32, tokens=2000, seed=0, correlated=False):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    # Inputs with very unequal channel scales, as in real LLM activations (outlier channels).
    scales = torch.logspace(-1, 1, in_features)
    inputs = torch.randn(tokens, in_features, generator=generator) * scales
    if correlated:  # channels mixed, as real hidden states are: a diagonal weighting is no longer optimal
        inputs = inputs @ torch.randn(in_features, in_features, generator=generator)
    statistic = inputs.pow(2).sum(0).sqrt()
    return weight, inputs, statistic


def _seen(inputs: torch.Tensor) -> ProjectionInputs:
    """What the layer walk records about these inputs (one sequence of `tokens` tokens)."""
    x = inputs.double()
    return ProjectionInputs(norm=x.pow(2).sum(0).sqrt(), mean=x.mean(0), mean_abs=x.abs().mean(0),
                            variance=x.var(0), gram=x.T @ x, tokens=x.shape[0])


def _output_error(inputs, weight, left, right):
    return (inputs.double() @ (weight.double() - left.double() @ right.double()).T).norm()


@pytest.mark.parametrize("method", [awsvd, plain_svd, asvd, svdllm])
def test_full_rank_reconstructs_the_weight(method):
    weight, inputs, _ = _weight_and_inputs()
    left, right = method(weight.double(), _seen(inputs), min(weight.shape))
    assert torch.allclose(left @ right, weight.double(), atol=1e-8)


@pytest.mark.parametrize("method", [awsvd, plain_svd, asvd, svdllm])
def test_factor_shapes(method):
    weight, inputs, _ = _weight_and_inputs()
    left, right = method(weight, _seen(inputs), 7)
    assert left.shape == (48, 7) and right.shape == (7, 32)


def test_awsvd_output_error_is_at_most_plain_svd():
    weight, inputs, statistic = _weight_and_inputs()
    for rank in (2, 4, 8, 16, 24):
        errors = {}
        for method in (awsvd, plain_svd):
            left, right = method(weight.double(), ProjectionInputs.from_norm(statistic.double()), rank)
            errors[method.__name__] = _output_error(inputs, weight, left, right)
        # Weighting by the channel norms is optimal for the diagonal of the input covariance;
        # on these (nearly independent) channels it must not lose to plain SVD.
        assert errors["awsvd"] <= errors["plain_svd"] * 1.0001, rank


def test_awsvd_is_optimal_in_the_weighted_norm():
    weight, _, statistic = _weight_and_inputs()
    d = torch.diag(statistic.double())
    rank = 8
    left, right = awsvd(weight.double(), ProjectionInputs.from_norm(statistic.double()), rank)
    error = ((weight.double() - left @ right) @ d).norm()
    singular = torch.linalg.svdvals(weight.double() @ d)
    # Eckart-Young: the error in the weighted norm is exactly the discarded singular values.
    assert torch.isclose(error, singular[rank:].pow(2).sum().sqrt(), rtol=1e-9)


def test_zero_statistic_is_replaced_by_epsilon():
    weight, _, statistic = _weight_and_inputs()
    statistic[3] = 0
    left, right = awsvd(weight.double(), ProjectionInputs.from_norm(statistic.double()), 32)
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


def test_asvd_scales_by_the_mean_absolute_activation_to_the_power_alpha():
    weight, inputs, _ = _weight_and_inputs()
    seen = _seen(inputs)
    scale = seen.mean_abs.pow(ASVD_ALPHA)
    rank = 8
    left, right = asvd(weight.double(), seen, rank)
    # Eckart-Young in ASVD's norm: ||(W - W') S|| is exactly the tail of W S's spectrum ...
    error = ((weight.double() - left @ right) * scale[None, :]).norm()
    assert torch.isclose(error, torch.linalg.svdvals(weight.double() * scale).pow(2)[rank:].sum().sqrt(), rtol=1e-9)
    # ... and that is not the same factorization as AWSVD's (a different scale).
    other_left, other_right = awsvd(weight.double(), seen, rank)
    assert not torch.allclose(left @ right, other_left @ other_right, atol=1e-6)


def test_svdllm_truncation_error_is_the_discarded_whitened_singular_values():
    weight, inputs, _ = _weight_and_inputs(correlated=True)
    seen = _seen(inputs)
    rank = 8
    left, right = svdllm(weight.double(), seen, rank)
    whitened = torch.linalg.svdvals(weight.double() @ torch.linalg.cholesky(seen.gram))
    assert torch.isclose(_output_error(inputs, weight, left, right), whitened[rank:].pow(2).sum().sqrt(), rtol=1e-6)


def test_svdllm_has_the_lowest_output_error_on_correlated_inputs():
    weight, inputs, _ = _weight_and_inputs(correlated=True)
    seen = _seen(inputs)
    for rank in (2, 4, 8, 16, 24):
        errors = {m.__name__: _output_error(inputs, weight, *m(weight.double(), seen, rank)) for m in (awsvd, plain_svd, asvd, svdllm)}
        best = min(errors, key=errors.get)
        assert best == "svdllm", (rank, errors)


def test_whitening_survives_a_dead_input_channel():
    weight, inputs, _ = _weight_and_inputs()
    inputs[:, 5] = 0  # a channel that is never active: the Gram matrix is singular
    seen = _seen(inputs)
    factor = whitening_factor(seen.gram)
    assert torch.isfinite(factor).all()
    left, right = svdllm(weight.double(), seen, 8)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


def test_methods_that_need_statistics_say_so():
    from lorap.errors import LorapError

    weight = torch.randn(8, 6)
    with pytest.raises(LorapError, match="Gram"):
        svdllm(weight, ProjectionInputs.from_norm(torch.ones(6)), 2)
    with pytest.raises(LorapError, match="mean absolute"):
        asvd(weight, ProjectionInputs.from_norm(torch.ones(6)), 2)


def test_whitening_shrink_moves_svdllm_to_awsvd():
    from lorap.methods.factorizations import shrunk_gram

    weight, inputs, _ = _weight_and_inputs(correlated=True)
    seen = _seen(inputs)
    rank = 8
    product = lambda pair: pair[0] @ pair[1]  # noqa: E731
    # 0 is SVD-LLM untouched, bit for bit (best's golden outputs depend on it) ...
    assert shrunk_gram(seen.gram, 0.0) is seen.gram
    assert torch.equal(product(svdllm(weight.double(), seen, rank, whitening_shrink=0.0)),
                       product(svdllm(weight.double(), seen, rank)))
    # ... 1 whitens by the diagonal alone, which is AWSVD's scaling (up to a constant) ...
    assert torch.allclose(product(svdllm(weight.double(), seen, rank, whitening_shrink=1.0)),
                          product(awsvd(weight.double(), seen, rank)), atol=1e-8)
    # ... and in between the output error on the calibration inputs grows as the shrink trusts them less.
    errors = [_output_error(inputs, weight, *svdllm(weight.double(), seen, rank, whitening_shrink=s))
              for s in (0.0, 0.3, 0.7, 1.0)]
    assert errors == sorted(errors) and errors[0] < errors[-1], errors
