"""The method registry: every registered part runs, and everything that lists parts reads it.

A new factorization, FFN criterion, update or allocation is picked up by the parametrized tests
here without editing them; the last test adds a made-up criterion from this file alone.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from lorap.cli import build_parser, main
from lorap.errors import LorapError
from lorap.methods.presets import BEST_RIDGES, config_for
from lorap.methods.registry import FFN_SCORES, REGISTRIES, MethodSpec, options_table
from lorap.options import Option
from lorap.pipeline.config import CompressionConfig
from lorap.pipeline.run import compress_model
from lorap.plan.counting import count_parameters

SMALL = dict(calibration_samples=8, calibration_seqlen=32, batch_size=4)
EVERY_PART = [(part, spec.name) for part, registry in REGISTRIES.items() for spec in registry]
HEAD_PARTS = ("head_score", "head_update")  # used with --attention heads
HEAD_DIM_PARTS = ("head_dim_score", "head_dim_update")  # used with --attention headdim


@pytest.mark.parametrize("part,name", EVERY_PART, ids=[f"{p}={n}" for p, n in EVERY_PART])
def test_every_registered_part_compresses_a_model_to_its_plan(part, name, tiny_tokenizer):
    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer))
    dense = count_parameters(model)
    attention = "heads" if part in HEAD_PARTS else "headdim" if part in HEAD_DIM_PARTS else "lowrank"
    settings = {part: name, "attention": attention}
    config = config_for("paper", ratio=0.3, **settings, **SMALL)
    result = compress_model(model, tiny_tokenizer, config, progress=False)
    assert count_parameters(model) == result.plan.compressed_parameters < dense
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 500, (2, 16))).logits).all()
    spec = REGISTRIES[part][name]
    if spec.needs_whole_model:
        assert spec.prepare_phase in result.timings
    if part in HEAD_PARTS:  # one of the two KV groups removed, its output compensated in o_proj
        assert [layer.kv_heads for layer in result.plan.layers] == [1, 1]
        assert any(layer.o_bias_added for layer in result.plan.layers) == spec.adds_bias
    else:
        assert any(layer.down_bias_added for layer in result.plan.layers) == spec.adds_bias


@pytest.mark.parametrize("part,name", EVERY_PART, ids=[f"{p}={n}" for p, n in EVERY_PART])
def test_the_cli_and_config_validation_offer_every_registered_part(part, name):
    option = REGISTRIES[part].option
    args = build_parser().parse_args(["plan", "--ratio", "0.2", option, name])
    assert getattr(args, part) == name
    config_for("paper", ratio=0.2, **{part: name}).validate()


def test_method_options_reach_only_the_parts_that_read_them():
    config = config_for("best", whitening_shrink=0.25, lstsq_ridge=0.2)
    assert config.options_of("factorization") == {"whitening_shrink": 0.25}
    assert config.options_of("ffn_update") == {"lstsq_ridge": 0.2}
    assert config.options_of("ffn_score") == {}
    args = build_parser().parse_args(["plan", "--ratio", "0.2", "--whitening-shrink", "0.3", "--lstsq-ridge", "1"])
    assert (args.whitening_shrink, args.lstsq_ridge) == (0.3, 1.0)
    names = {option.name for registry in REGISTRIES.values() for spec in registry for option in spec.options}
    assert {name: config.to_dict()[name] for name in names} == {"whitening_shrink": 0.25, "lstsq_ridge": 0.2}
    for bad, message in ((dict(whitening_shrink=1.5), "whitening-shrink must be in"),
                         (dict(lstsq_ridge=0.0), "lstsq-ridge must be positive")):
        with pytest.raises(LorapError, match=message):
            config_for("best", **bad).validate()


def test_best_sets_its_ridge_by_the_share_removed_and_a_given_ridge_wins():
    for ratio, expected in (*BEST_RIDGES, (BEST_RIDGES[0][0] / 2, BEST_RIDGES[0][1]), (0.9, BEST_RIDGES[-1][1])):
        assert config_for("best", ratio=ratio, mode="exact").option("lstsq_ridge") == expected
    for (low, light), (high, heavy) in zip(BEST_RIDGES, BEST_RIDGES[1:]):
        middle = config_for("best", ratio=(low + high) / 2).option("lstsq_ridge")
        assert middle == pytest.approx((light * heavy) ** 0.5, rel=1e-5)
    ridges = [config_for("best", ratio=r / 100).option("lstsq_ridge") for r in range(10, 70, 5)]
    assert ridges == sorted(ridges, reverse=True)  # never stronger where more is removed
    assert config_for("best").option("lstsq_ridge") == config_for("best", ratio=CompressionConfig.ratio).option("lstsq_ridge")
    assert config_for("best", ratio=0.5, lstsq_ridge=0.3).option("lstsq_ridge") == 0.3
    # the shrink is one number, and no other preset depends on the ratio
    assert config_for("best", ratio=0.2).option("whitening_shrink") == config_for("best", ratio=0.5).option("whitening_shrink")
    assert config_for("paper", ratio=0.2).to_dict() == {**config_for("paper", ratio=0.5).to_dict(), "ratio": 0.2}


def test_best_with_narrowed_heads_takes_their_chosen_split_and_refit_and_a_given_setting_wins():
    from lorap.cli import _method_settings
    from lorap.methods.presets import BEST_HEAD_DIMS

    narrowed = config_for("best", ratio=0.2, attention="headdim")
    assert {name: narrowed.to_dict()[name] for name in BEST_HEAD_DIMS} == BEST_HEAD_DIMS
    assert narrowed.option("lstsq_ridge") == config_for("best", ratio=0.2).option("lstsq_ridge")  # the refit's ridge
    pairs = config_for("best", ratio=0.2)
    assert (pairs.allocation_a, pairs.head_dim_update) == (3.0, "none")  # factor pairs keep a = 3
    assert config_for("best", ratio=0.2, attention="lowrank").to_dict() == pairs.to_dict()
    given = config_for("best", ratio=0.2, attention="headdim", allocation_a=3.0, head_dim_update="none")
    assert (given.allocation_a, given.head_dim_update) == (3.0, "none")
    args = build_parser().parse_args(["plan", "--ratio", "0.2", "--preset", "best", "--attention", "headdim"])
    assert config_for("best", **_method_settings(args)).to_dict() == narrowed.to_dict()


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(LorapError, match="unknown FFN channel criterion 'nope'; choose from lorap, magnitude"):
        config_for("paper", ratio=0.2, ffn_score="nope").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--ratio", "0.2", "--factorization", "nope"])


def test_the_options_page_table_is_the_registry():
    page = (Path(__file__).resolve().parents[1] / "docs" / "options.md").read_text()
    assert options_table() in page


def test_whole_model_passes_and_gram_matrices_come_from_the_registry():
    best = config_for("best", ratio=0.2)
    assert best.needs_whole_model and best.whole_model_parts() == ["ffn allocation adaptive"]
    assert best.gram_sources() == ("down_proj", "o_proj", "q_proj")
    assert config_for("paper", ratio=0.2).gram_sources() == ()
    assert not config_for("paper", ratio=0.2).needs_whole_model
    assert config_for("svd-llm-attention", ratio=0.2, sublayers=("ffn",)).gram_sources() == ()


def test_a_criterion_of_a_part_the_run_does_not_use_costs_no_whole_model_pass():
    # a Taylor head score with low-rank attention scores nothing: no gradient pass, none in the memory estimate
    lowrank = config_for("paper", ratio=0.2, head_score="llm-pruner-taylor")
    assert not lowrank.needs_whole_model and lowrank.whole_model_parts() == []
    heads = config_for("paper", ratio=0.2, attention="heads", head_score="llm-pruner-taylor")
    assert heads.whole_model_parts() == ["head score llm-pruner-taylor"]
    # FLAP's joint allocation of heads and channels runs even where only the attention is compressed
    flap = config_for("flap", ratio=0.2, sublayers=("attention",))
    assert flap.whole_model_parts() == ["ffn allocation adaptive"]
    assert config_for("best", ratio=0.2, sublayers=("attention",)).whole_model_parts() == []


def reversed_magnitude_scores(mlp, inputs):
    """A made-up criterion: the smallest weights matter most."""
    return -mlp.down_proj.weight.detach().float().abs().sum(0)


@pytest.fixture
def made_up_criterion():
    spec = FFN_SCORES.register(MethodSpec("reversed-magnitude", reversed_magnitude_scores, "smallest weights first"))
    yield spec
    FFN_SCORES.unregister(spec.name)


def test_a_new_ffn_criterion_is_one_function_and_one_registry_entry(made_up_criterion, tiny_tokenizer, tmp_path, capsys):
    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer))
    down = [layer.mlp.down_proj.weight.detach().abs().sum(0) for layer in model.model.layers]
    config = config_for("paper", ratio=0.3, ffn_score="reversed-magnitude", bottom_keep=0.0, **SMALL)
    result = compress_model(model, tiny_tokenizer, config, progress=False)
    for layer, column_sums, layer_plan in zip(model.model.layers, down, result.plan.layers):
        # it kept the channels with the smallest down-projection columns
        kept = torch.argsort(column_sums)[: layer_plan.ffn_width].sort().values
        assert torch.equal(layer.mlp.down_proj.weight, _dense_columns(model, layer, kept))
    # ... and the command line offers it, with its help
    assert main(["plan", "--ratio", "0.3", "--ffn-score", "reversed-magnitude", "--json"]) == 0
    assert "reversed-magnitude" in build_parser()._subparsers._group_actions[0].choices["compress"].format_help()


def _dense_columns(model, layer, kept):
    """The dense down projection's kept columns (rebuilt from a fresh model with the same seed)."""
    dense = build_tiny_model("llama_gqa", vocab_size=model.config.vocab_size)
    index = list(model.model.layers).index(layer)
    return dense.model.layers[index].mlp.down_proj.weight.detach()[:, kept]


RECEIVED_POWERS = []


def powered_reversed_scores(mlp, inputs, reversal_power: float):
    """A made-up criterion with an option of its own; it notes the value it is called with."""
    RECEIVED_POWERS.append(reversal_power)
    return -reversed_magnitude_scores(mlp, inputs).neg().pow(reversal_power)


@pytest.fixture
def made_up_criterion_with_option():
    power = Option("reversal_power", 1.0, "the power the reversed magnitudes are raised to", valid=lambda p: p > 0,
                   requirement="positive")
    spec = FFN_SCORES.register(MethodSpec("powered-reversed", powered_reversed_scores, "smallest weights first, powered",
                                          options=(power,)))
    yield spec
    FFN_SCORES.unregister(spec.name)


def test_a_part_option_is_declared_once_on_its_registry_entry(made_up_criterion_with_option, tiny_tokenizer, tmp_path):
    from lorap import api
    from lorap.cli import _method_settings

    compress_help = build_parser()._subparsers._group_actions[0].choices["compress"].format_help()
    assert "--reversal-power" in compress_help and "with --ffn-score powered-reversed" in compress_help
    args = build_parser().parse_args(["compress", "--out", "o", "--ratio", "0.3", "--ffn-score", "powered-reversed",
                                      "--reversal-power", "3"])
    config = config_for("paper", **{**_method_settings(args), **SMALL})
    assert config.options_of("ffn_score") == {"reversal_power": 3.0}
    assert config_for("paper", ratio=0.3).options_of("ffn_score") == {}  # the paper's criterion reads none
    assert config_for("paper", ratio=0.3, ffn_score="powered-reversed").options_of("ffn_score") == {"reversal_power": 1.0}
    with pytest.raises(LorapError, match="--reversal-power must be positive, got -1"):
        config_for("paper", ratio=0.3, reversal_power=-1).validate()
    # the run passes it to the criterion of every layer, and the checkpoint records it
    folder = tmp_path / "tiny"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    RECEIVED_POWERS.clear()
    result = api.compress(folder, tmp_path / "out", config, predict_speed=False, progress=False)
    assert RECEIVED_POWERS == [3.0, 3.0]  # two layers
    assert result.report["settings"]["reversal_power"] == 3.0
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["lorap"]["compression"]
    assert recorded["reversal_power"] == 3.0 and recorded["ffn_score"] == "powered-reversed"
