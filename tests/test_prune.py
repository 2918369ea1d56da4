"""FFN channel scores and the 1% rule."""
import pytest
import torch
from torch import nn

from lorap.architectures import Architecture
from lorap.methods.ffn_pruning import kept_channels, prune_ffn
from lorap.methods.ffn_scores import channel_scores


def prune_in_place(ffn, *args):
    """What the layer step does through the architecture adapter: the pruned linears replace the FFN's."""
    pruned = prune_ffn(ffn, *args)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(ffn, name, getattr(pruned, name))


class GatedFFN(nn.Module):
    def __init__(self, hidden=8, width=200):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_one_percent_rule_on_a_constructed_case():
    width = 200
    scores = torch.randperm(width).float()  # channel c has score scores[c]; all distinct
    ranked = torch.argsort(scores)
    keep = kept_channels(scores, kept_width=width - 60, bottom_keep=0.01)
    kept = set(keep.tolist())
    assert len(kept) == 140
    assert set(ranked[:2].tolist()) <= kept  # the lowest 1% (2 channels) survive
    assert not (set(ranked[2:62].tolist()) & kept)  # the next 30% are gone
    assert set(ranked[62:].tolist()) <= kept  # the rest survive
    assert torch.equal(keep, torch.sort(keep).values)  # original order kept


def test_without_bottom_keep_the_lowest_go():
    scores = torch.arange(100.0).flip(0)
    keep = kept_channels(scores, kept_width=90, bottom_keep=0.0)
    assert set(keep.tolist()) == set(range(90))


def test_channel_score_definition():
    torch.manual_seed(0)
    ffn = GatedFFN()
    stats = {"gate_proj": torch.rand(8), "up_proj": torch.rand(8), "down_proj": torch.rand(200)}
    scores = channel_scores(ffn, stats)
    c = 17
    expected = (
        (ffn.up_proj.weight[c].abs() * stats["up_proj"]).norm()
        + (ffn.gate_proj.weight[c].abs() * stats["gate_proj"]).norm()
        + (ffn.down_proj.weight[:, c].abs() * stats["down_proj"][c]).norm()
    )
    assert torch.isclose(scores[c], expected)


def test_pruning_removes_exactly_the_channels():
    torch.manual_seed(0)
    ffn = GatedFFN()
    x = torch.randn(4, 8)
    keep = torch.arange(0, 200, 2)
    # Reference: zero the dropped channels' contribution in the dense FFN.
    mask = torch.zeros(200)
    mask[keep] = 1
    expected = ffn.down_proj(nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x) * mask)
    prune_in_place(ffn, keep)
    assert ffn.gate_proj.weight.shape == (100, 8) and ffn.down_proj.weight.shape == (8, 100)
    assert torch.allclose(ffn(x), expected, atol=1e-6)


# ---------------------------------------------------------------- the baselines' criteria


def _ffn_and_inputs(seed=0, tokens=3000):
    """An FFN, calibration inputs x, the down projection's inputs h, and what the walk records of them."""
    from lorap.pipeline.statistics import ProjectionInputs

    torch.manual_seed(seed)
    ffn = GatedFFN()
    x = torch.randn(tokens, 8) * torch.logspace(-1, 0.5, 8)
    with torch.no_grad():
        h = nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x)

    def seen(values):
        v = values.double()
        return ProjectionInputs(norm=v.pow(2).sum(0).sqrt().float(), mean=v.mean(0), mean_abs=v.abs().mean(0),
                                variance=v.var(0), gram=v.T @ v, tokens=v.shape[0])

    inputs = {"gate_proj": seen(x), "up_proj": seen(x), "down_proj": seen(h)}
    return ffn, x, h, inputs


def test_magnitude_is_the_sum_of_the_channel_weight_norms():
    ffn, _, _, inputs = _ffn_and_inputs()
    c = 3
    expected = ffn.up_proj.weight[c].norm() + ffn.gate_proj.weight[c].norm() + ffn.down_proj.weight[:, c].norm()
    assert torch.isclose(channel_scores(ffn, inputs, "magnitude")[c], expected)


def test_llm_pruner_l2_is_the_squared_norm_of_the_whole_group():
    ffn, _, _, inputs = _ffn_and_inputs()
    c = 3
    group = torch.cat([ffn.up_proj.weight[c], ffn.gate_proj.weight[c], ffn.down_proj.weight[:, c]])
    assert torch.isclose(channel_scores(ffn, inputs, "llm-pruner-l2")[c], group.pow(2).sum())


def test_wanda_sp_weighs_down_columns_by_their_input_norm():
    ffn, _, h, inputs = _ffn_and_inputs()
    c = 11
    expected = (ffn.down_proj.weight[:, c].abs() * h[:, c].norm()).sum()
    assert torch.isclose(channel_scores(ffn, inputs, "wanda-sp")[c], expected, rtol=1e-5)


def test_flap_fluctuation_is_input_variance_times_squared_column_norm():
    ffn, _, h, inputs = _ffn_and_inputs()
    scores = channel_scores(ffn, inputs, "flap")
    c = 11
    assert torch.isclose(scores[c], h[:, c].var() * ffn.down_proj.weight[:, c].pow(2).sum(), rtol=1e-4)
    # A channel that never fluctuates scores zero however large its weights: its output is a constant.
    constant = inputs["down_proj"]
    constant.variance = constant.variance.clone()
    constant.variance[5] = 0
    assert channel_scores(ffn, inputs, "flap")[5] == 0


def test_bias_compensation_adds_the_removed_channels_mean_output():
    ffn, x, h, inputs = _ffn_and_inputs()
    keep = torch.arange(0, 200, 2)
    dropped = torch.arange(1, 200, 2)
    with torch.no_grad():
        dense_out = ffn(x)
        expected_bias = ffn.down_proj.weight[:, dropped].double() @ h[:, dropped].double().mean(0)
    prune_in_place(ffn, keep, "bias", inputs["down_proj"])
    assert ffn.down_proj.bias is not None
    assert torch.allclose(ffn.down_proj.bias.double(), expected_bias, atol=1e-5)
    with torch.no_grad():
        # The mean output over the calibration tokens is now exactly the dense one.
        assert torch.allclose(ffn(x).mean(0), dense_out.mean(0), atol=1e-5)


def test_lstsq_update_has_lower_error_than_bias_which_beats_nothing():
    errors = {}
    for update in ("none", "bias", "lstsq"):
        ffn, x, _, inputs = _ffn_and_inputs()
        with torch.no_grad():
            dense_out = ffn(x)
        keep = kept_channels(channel_scores(ffn, inputs, "lorap"), 120, 0.0)
        prune_in_place(ffn, keep, update, inputs["down_proj"])
        with torch.no_grad():
            errors[update] = (ffn(x) - dense_out).pow(2).sum().item()
    assert errors["lstsq"] < errors["bias"] < errors["none"], errors


def test_lstsq_ridge_runs_from_the_closest_fit_to_bias_compensation():
    from lorap.methods.ffn_pruning import bias_compensation, least_squares_refit

    errors = {}
    for ridge in (1e-3, 1e-1, 10.0):
        ffn, x, _, inputs = _ffn_and_inputs()  # afresh: the refit takes the Gram matrix it reads
        keep = kept_channels(channel_scores(ffn, inputs, "lorap"), 120, 0.0)
        pruned = prune_ffn(ffn, keep, "lstsq", inputs["down_proj"], {"lstsq_ridge": ridge})
        with torch.no_grad():
            out = pruned.down_proj(nn.functional.silu(pruned.gate_proj(x)) * pruned.up_proj(x))
            errors[ridge] = (out - ffn(x)).pow(2).sum().item()
    assert errors[1e-3] < errors[1e-1] < errors[10.0], errors  # a stronger ridge fits the calibration text less
    # An overwhelming ridge leaves only the mean: the refit becomes bias compensation.
    ffn, x, _, inputs = _ffn_and_inputs()
    dropped = torch.ones(200, dtype=torch.bool)
    dropped[keep] = False
    weight = ffn.down_proj.weight.detach().float()
    delta, bias = least_squares_refit(weight, dropped, inputs["down_proj"], lstsq_ridge=1e9)
    _, bias_only = bias_compensation(weight, dropped, inputs["down_proj"])
    assert delta.abs().max() < 1e-6 and torch.allclose(bias, bias_only, atol=1e-6)


def test_updates_are_validated_and_need_their_statistics():
    from lorap.pipeline.statistics import ProjectionInputs
    from lorap.errors import LorapError

    ffn, _, _, inputs = _ffn_and_inputs()
    with pytest.raises(LorapError, match="FFN update"):
        prune_ffn(ffn, torch.arange(100), "median", inputs["down_proj"])
    no_gram = ProjectionInputs(norm=inputs["down_proj"].norm, mean=inputs["down_proj"].mean, tokens=10)
    with pytest.raises(LorapError, match="Gram"):
        prune_ffn(ffn, torch.arange(100), "lstsq", no_gram)


def test_walk_statistics_match_a_direct_computation():
    from lorap.pipeline.statistics import InputStatistics

    from conftest import build_tiny_model

    model = build_tiny_model("llama_gqa", vocab_size=64)
    captured = {}
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0].detach()))
    stats = InputStatistics(Architecture(model.config).input_modules(model.model.layers[0]), gram_sources=("down_proj",))
    tokens = torch.randint(0, 64, (3, 10))
    with stats.recording(), torch.no_grad():
        model(tokens, use_cache=False)
    h = captured["h"].reshape(-1, captured["h"].shape[-1]).double()
    seen = stats.inputs("down_proj")
    assert seen.tokens == 30
    assert torch.allclose(seen.mean, h.mean(0), atol=1e-6)
    assert torch.allclose(seen.variance, h.var(0), atol=1e-5)
    assert torch.allclose(seen.mean_abs, h.abs().mean(0), atol=1e-6)
    assert torch.allclose(seen.gram, h.T @ h, atol=1e-4)
    assert torch.allclose(seen.norm.double(), (h.pow(2).sum(0) / 3).sqrt(), atol=1e-5)  # per sequence, as the paper
    assert stats.inputs("q_proj").gram is None  # only requested sources pay for a Gram matrix


@pytest.mark.parametrize("width", [100, 300, 1000])  # not cut, cut in 2, cut in 4 (statistics._gram_blocks)
def test_gram_from_the_blocks_above_the_diagonal_is_the_whole_product(width):
    from lorap.pipeline.statistics import _add_in_rows, _gram_blocks, add_upper_gram, mirror_gram

    generator = torch.Generator().manual_seed(width)
    batches = [torch.randn(64, width, generator=generator) * torch.rand(width, generator=generator) for _ in range(3)]
    whole = torch.zeros(width, width, dtype=torch.float64)
    upper = torch.zeros(width, width, dtype=torch.float64)
    for flat in batches:
        _add_in_rows(whole, flat.T @ flat)
        add_upper_gram(upper, flat)
    mirror_gram(upper)
    assert len(_gram_blocks(width)) == {100: 1, 300: 2, 1000: 4}[width]
    assert torch.equal(upper, upper.T)
    assert torch.allclose(upper, whole, rtol=1e-6, atol=1e-6)


def test_adaptive_widths_remove_the_lowest_standardised_scores_of_the_whole_model():
    from lorap.methods.allocations import MIN_KEPT_FRACTION, adaptive_widths

    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(100, generator=generator).pow(p) for p in (1.0, 0.2, 4.0)]
    widths = adaptive_widths(scores, removed_total=90, bottom_keep=0.0)
    assert sum(100 - w for w in widths) == 90
    assert len(set(widths)) > 1  # differently shaped layers lose different amounts
    # Exactly the 90 lowest (score - layer mean) / layer std of the whole model are removed.
    standardised = [(s.double() - s.double().mean()) / s.double().std() for s in scores]
    threshold = torch.sort(torch.cat(standardised)).values[89]
    assert widths == [100 - int((z <= threshold).sum()) for z in standardised]
    # Standardised per layer: scaling or shifting one layer's scores changes nothing.
    assert adaptive_widths([scores[0] * 1000, scores[1] + 5, scores[2]], 90, 0.0) == widths
    # However low a layer's scores, it keeps its protected channels and the floor.
    widths = adaptive_widths([scores[0], scores[1] - 100 * (scores[1] < 0.99), scores[2]], 150, bottom_keep=0.05)
    assert sum(100 - w for w in widths) == 150
    assert all(w >= 5 + int(MIN_KEPT_FRACTION * 100) for w in widths)  # 5 protected + the floor
