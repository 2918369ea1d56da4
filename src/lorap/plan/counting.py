"""The one place parameters are counted. Reports, plans and tests all use these functions."""


def count_parameters(model) -> int:
    """Distinct parameters of a model (a tied embedding / LM head counts once)."""
    return sum(p.numel() for p in model.parameters())


def linear_parameters(in_features: int, out_features: int, bias: bool = False, rank: int | None = None) -> int:
    """Parameters of a dense linear layer, or of its factorized pair x -> L(Rx) when `rank` is given.

    A bias stays on the outer factor, so it counts once either way.
    """
    weights = out_features * in_features if rank is None else rank * (in_features + out_features)
    return weights + (out_features if bias else 0)


def factorization_saves(in_features: int, out_features: int, rank: int, max_fraction: float = 1.0) -> bool:
    """A rank-k pair is only worth it when strictly smaller than the dense matrix, and (with
    `max_fraction` < 1) at most that fraction of its size: smaller than that it is also faster."""
    pair, dense = rank * (in_features + out_features), in_features * out_features
    return pair < dense and (max_fraction >= 1 or pair <= max_fraction * dense)
