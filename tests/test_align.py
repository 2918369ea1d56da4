"""`--align N`: ranks and FFN widths in multiples of N, the budget still met, the paper's integers
untouched at N = 1, and the alignment recorded in the checkpoint."""
import json

import pytest

from conftest import tiny_config
from lorap import api
from lorap.cli import main
from lorap.errors import LorapError
from lorap.methods.allocations import aligned_widths
from lorap.methods.presets import config_for
from lorap.plan.plan import EXACT_TOLERANCE, PlanSettings, make_plan


@pytest.fixture
def llama7b(tmp_path):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=32000, tie_word_embeddings=False)


def _shapes(plan):
    ranks = {rank for layer in plan.layers for rank in layer.ranks.values() if rank is not None}
    return ranks, {layer.ffn_width for layer in plan.layers}


def test_align_1_is_the_paper_and_align_32_rounds_to_multiples(llama7b):
    paper = make_plan(llama7b, PlanSettings(0.2))
    assert _shapes(paper) == ({1228}, {8807})
    aligned = make_plan(llama7b, PlanSettings(0.2, align=32))
    assert _shapes(aligned) == ({1216}, {8800})
    half = make_plan(llama7b, PlanSettings(0.5, align=64))
    ranks, widths = _shapes(half)
    assert all(r % 64 == 0 for r in ranks) and all(w % 64 == 0 for w in widths)


@pytest.mark.parametrize("align", [8, 32, 64, 128])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_exact_mode_meets_the_budget_with_aligned_shapes(align, ratio):
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    plan = make_plan(smollm2, PlanSettings(ratio, mode="exact", align=align))
    assert abs(plan.removed_fraction - ratio) <= EXACT_TOLERANCE
    ranks, widths = _shapes(plan)
    assert all(r % align == 0 for r in ranks) and all(w % align == 0 for w in widths)


def test_a_rank_that_would_not_save_after_rounding_stays_dense():
    from lorap.plan.ranks import aligned_ranks

    shapes = {"q_proj": (64, 64, False), "k_proj": (32, 64, False)}
    assert aligned_ranks({"q_proj": 20, "k_proj": 20}, shapes, 16) == {"q_proj": 16, "k_proj": 16}
    # rank 32 would cost 32 * (64 + 64) = 4096, no fewer than the dense 64 x 64 weights
    assert aligned_ranks({"q_proj": 20, "k_proj": 20}, shapes, 32) == {"q_proj": None, "k_proj": None}


def test_adaptive_widths_are_aligned_and_keep_their_total():
    widths = [1000, 1234, 1100, 901, 1536]
    aligned = aligned_widths(widths, 64, 1536)
    assert all(w % 64 == 0 for w in aligned)
    assert abs(sum(aligned) - sum(widths)) < 64
    assert aligned_widths(widths, 1, 1536) == widths


@pytest.mark.parametrize("value", ["0", "-8", "1.5", "x"])
def test_align_must_be_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--ratio", "0.2", "--align", value])
    assert "argument --align: must be a positive integer" in capsys.readouterr().err
    with pytest.raises(LorapError, match="--align must be a positive integer"):
        make_plan(tiny_config("llama_gqa"), PlanSettings(0.2, align=0))


def test_the_alignment_is_recorded_and_the_checkpoint_has_its_shapes(tiny_model_dir, tmp_path):
    result = api.compress(str(tiny_model_dir), tmp_path / "out", preset="best", ratio=0.3, align=16,
                          progress=False, calibration_samples=8, calibration_seqlen=32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["lorap"]["compression"]["align"] == 16
    widths = [layer["intermediate_size"] for layer in config["lorap"]["layers"]]
    ranks = [rank for layer in config["lorap"]["layers"] for name, rank in layer.items() if name.endswith("_proj")
             and rank not in (None, True)]
    assert all(w % 16 == 0 for w in widths) and all(r % 16 == 0 for r in ranks)
    reloaded, _ = api.load(tmp_path / "out")
    assert sum(p.numel() for p in reloaded.parameters()) == result.report["plan"]["totals"]["compressed_parameters"]


def test_a_budget_too_fine_for_the_alignment_is_refused_clearly():
    """Two layers of 160 channels cannot remove exactly 30% in blocks of 16 channels and ranks."""
    with pytest.raises(LorapError, match="too coarse for this target at this --align"):
        make_plan(tiny_config("llama_gqa"), PlanSettings(0.3, mode="exact", align=16))


def test_config_for_takes_align():
    assert config_for("paper", ratio=0.2, align=64).plan_settings().align == 64


# ---------------------------------------------------------------- --align auto


def test_align_auto_takes_the_devices_multiple_and_the_paper_keeps_its_integers(llama7b, monkeypatch):
    from lorap.plan import alignment

    monkeypatch.setattr(alignment, "device_default", lambda: 64)
    assert _shapes(make_plan(llama7b, config_for("paper", ratio=0.2).plan_settings())) == ({1228}, {8807})
    for preset in ("paper", "best", "svd-llm-attention"):
        plan = make_plan(llama7b, config_for(preset, ratio=0.2, align="auto").plan_settings())
        assert plan.settings.align == 64  # the plan records the multiple it used
        ranks, widths = _shapes(plan)
        assert all(r % 64 == 0 for r in ranks) and all(w % 64 == 0 for w in widths)


def test_the_auto_multiple_shrinks_for_small_models_and_to_meet_an_exact_budget(monkeypatch):
    from lorap.plan import alignment

    monkeypatch.setattr(alignment, "device_default", lambda: 64)
    assert alignment.default_alignments(tiny_config("llama_gqa")) == [8, 4, 2, 1]  # hidden 64: at most 64 / 8
    assert alignment.default_alignments(tiny_config("llama_gqa", hidden_size=576))[0] == 64
    # 30% exact of the tiny model cannot be met in blocks of 8; auto falls back to a finer multiple.
    plan = make_plan(tiny_config("llama_gqa"), config_for("best", ratio=0.3, mode="exact", align="auto").plan_settings())
    assert plan.settings.align in (1, 2, 4) and abs(plan.removed_fraction - 0.3) <= EXACT_TOLERANCE


def test_align_auto_is_recorded_as_the_multiple_used(tiny_model_dir, tmp_path, capsys):
    assert main(["plan", str(tiny_model_dir), "--ratio", "0.2", "--align", "auto", "--json", "--no-speed"]) == 0
    planned = json.loads(capsys.readouterr().out)["settings"]["align"]
    result = api.compress(str(tiny_model_dir), tmp_path / "out", preset="best", ratio=0.2, align="auto",
                          progress=False, calibration_samples=8, calibration_seqlen=32, predict_speed=False)
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["lorap"]["compression"]["align"]
    assert recorded == result.report["plan"]["settings"]["align"] == planned > 1


# ---------------------------------------------------------------- which presets align, and pairs that stay dense


def test_best_and_the_baselines_align_by_default_and_the_paper_and_its_ablations_do_not():
    from lorap.methods.presets import METHODS

    deployed = {"best", "svd-magnitude", "modegpt", "wanda-sp", "flap", "llm-pruner-l2", "llm-pruner-taylor",
                "wanda-sp-ffn", "flap-ffn", "llm-pruner-l2-ffn", "llm-pruner-taylor-ffn"}
    for name in METHODS:
        expected = "auto" if name in deployed else 256 if name == "serving" else 1  # serving: the engines' multiple
        assert config_for(name).align == expected, name
    assert config_for("best", align=1).align == 1  # --align 1 turns it off


def test_an_alignment_that_would_remove_nothing_is_refused():
    settings = config_for("serving", ratio=0.2).plan_settings()
    with pytest.raises(LorapError, match="nothing would be removed.*--align 256"):
        make_plan(tiny_config("llama_gqa"), settings)  # FFN 160 rounds back to 160 in blocks of 256
    assert make_plan(tiny_config("llama_gqa", intermediate_size=1024), settings).removed_fraction > 0


def test_a_pair_too_large_to_run_faster_stays_dense_and_its_budget_goes_elsewhere(monkeypatch):
    """Under auto alignment a factor pair above the device's size limit stays dense; exact mode
    still meets the budget, by removing more elsewhere."""
    from transformers import LlamaConfig

    from lorap.plan import alignment
    from lorap.plan.counting import factorization_saves
    from lorap.plan.ranks import attention_ranks

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576)}
    # at 80% kept, k and v (192 x 576) would get pairs of about 0.8 of their size: over a 0.6 limit
    limited = attention_ranks(shapes, 0.8, 3.0, limit=lambda weights: 0.6)
    for name, rank in limited.items():
        out_features, in_features = shapes[name]
        assert rank is None or rank * (in_features + out_features) <= 0.6 * in_features * out_features, name
    assert None in limited.values() and limited != attention_ranks(shapes, 0.8, 3.0)
    kept = sum(o * i if limited[n] is None else limited[n] * (o + i) for n, (o, i) in shapes.items())
    assert kept <= 0.8 * sum(o * i for o, i in shapes.values())  # the dense ones are paid for
    assert factorization_saves(576, 576, 100) and not factorization_saves(576, 576, 200, max_fraction=0.6)

    monkeypatch.setattr(alignment, "device_default", lambda: 16)
    monkeypatch.setitem(alignment.PAIR_LIMITS, "cpu", ((1, 0.6),))
    monkeypatch.setattr(alignment, "device_kind", lambda: "cpu")
    plan = make_plan(smollm2, config_for("best", ratio=0.2, mode="exact").plan_settings())
    assert plan.settings.pair_limit == "cpu" and plan.settings.align == 16
    assert abs(plan.removed_fraction - 0.2) <= EXACT_TOLERANCE
    for layer in plan.layers:
        for name, rank in layer.ranks.items():
            out_features, in_features = plan.attention[name][:2]
            assert rank is None or rank * (in_features + out_features) <= 0.6 * in_features * out_features


def test_the_pair_limit_is_recorded_in_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from lorap.plan import alignment

    monkeypatch.setattr(alignment, "device_kind", lambda: "cpu")
    api.compress(str(tiny_model_dir), tmp_path / "out", preset="best", ratio=0.2, progress=False,
                 calibration_samples=8, calibration_seqlen=32, predict_speed=False)
    compression = json.loads((tmp_path / "out" / "config.json").read_text())["lorap"]["compression"]
    assert compression["pair_limit"] == "cpu" and compression["align"] > 1


def test_the_pair_limits_follow_the_measured_sizes():
    from lorap.plan.alignment import pair_max_fraction

    assert pair_max_fraction("none", 4096 * 4096) == 1.0
    # cuda: measured on LLaMA shapes only; a smaller matrix takes the smallest one's limit
    assert pair_max_fraction("cuda", 64) == pair_max_fraction("cuda", 4096 * 1024) == 0.84
    assert 0.84 < pair_max_fraction("cuda", 4096 * 2048) < 0.93 and pair_max_fraction("cuda", 8192 * 8192) == 0.93
    assert pair_max_fraction("cpu", 64 * 64) == 0.57  # below the smallest measured: clamped
    assert 0.57 < pair_max_fraction("cpu", 576 * 192 * 2) < 0.62  # between two measured sizes
    assert pair_max_fraction("cpu", 8192 * 8192) == 0.90
