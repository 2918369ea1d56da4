"""The plan: reference figures of the paper, GQA generalisation, exact mode, counting."""
import pytest
from transformers import LlamaConfig

from conftest import build_tiny_model, tiny_config
from lorap.plan.plan import EXACT_TOLERANCE, PlanSettings, make_plan
from lorap.plan.ranks import attention_ranks, reference_square_ranks
from lorap.plan.counting import count_parameters
from lorap.errors import LorapError

LLAMA_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
SMOLLM2 = LlamaConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize(
    "ratio, qk, vo, ffn",
    [(0.2, 1228, None, 8807), (0.5, 512, 1536, 5504)],
)
def test_llama7b_reference_figures(ratio, qk, vo, ffn):
    plan = make_plan(LLAMA_7B, PlanSettings(ratio))
    for layer in plan.layers:
        assert layer.ranks == {"q_proj": qk, "k_proj": qk, "v_proj": vo, "o_proj": vo}
        assert layer.ffn_width == ffn


def test_llama7b_whole_model_size_at_20_percent():
    plan = make_plan(LLAMA_7B, PlanSettings(0.2))
    assert plan.dense_parameters == 6_738_415_616  # LLaMA-7B
    assert abs(plan.compressed_parameters / 1e9 - 5.44) < 0.005
    assert 0.191 < plan.removed_fraction < 0.193


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9])
def test_square_attention_uses_reference_rule(keep):
    shapes = {n: (4096, 4096, False) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert attention_ranks(shapes, keep, 3.0) == reference_square_ranks(4096, keep, 3.0)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5, 0.7])
def test_gqa_attention_keeps_about_the_asked_fraction(ratio):
    plan = make_plan(SMOLLM2, PlanSettings(ratio))
    attention = plan.to_dict()["totals"]["attention"]
    # parameter-count generalisation: the kept attention is (1 - ratio) of it, up to rounding of ranks
    assert attention["removed_fraction"] == pytest.approx(ratio, abs=0.01)
    ranks = plan.layers[0].ranks
    for name, (out_f, in_f, _) in plan.attention.items():
        if ranks[name] is not None:  # no factorization that is not smaller than the dense matrix
            assert ranks[name] * (out_f + in_f) < out_f * in_f


def test_gqa_split_is_a_to_one_when_nothing_stays_dense():
    plan = make_plan(SMOLLM2, PlanSettings(0.7, allocation_a=3.0))
    rows = {r["module"]: r["parameters"] for r in plan.rows if r["layer"] == 0}
    assert all(plan.layers[0].ranks[n] is not None for n in rows if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")))
    vo, qk = rows["v_proj"] + rows["o_proj"], rows["q_proj"] + rows["k_proj"]
    assert vo / qk == pytest.approx(3.0, rel=0.03)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("config", [LLAMA_7B, SMOLLM2], ids=["llama7b", "smollm2"])
def test_exact_mode_hits_the_whole_model_ratio(config, ratio):
    plan = make_plan(config, PlanSettings(ratio, mode="exact"))
    assert abs(plan.removed_fraction - ratio) <= EXACT_TOLERANCE
    assert plan.layer_ratio > ratio  # embeddings are untouched, so layers must lose more


def test_reference_mode_removes_a_bit_less_than_asked():
    plan = make_plan(SMOLLM2, PlanSettings(0.2))
    assert plan.removed_fraction < 0.2
    assert plan.layers[0].ffn_width == 1536 - int(0.2 * 1536)


def test_exact_mode_refuses_an_unreachable_target():
    with pytest.raises(LorapError, match="at most"):
        make_plan(SMOLLM2, PlanSettings(0.9, mode="exact", sublayers=("attention",)))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 0.95, 1.0])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(LorapError, match="ratio must be in"):
        make_plan(SMOLLM2, PlanSettings(ratio))


def test_sublayer_selection():
    attention_only = make_plan(SMOLLM2, PlanSettings(0.3, sublayers=("attention",)))
    assert attention_only.layers[0].ffn_width == 1536
    ffn_only = make_plan(SMOLLM2, PlanSettings(0.3, sublayers=("ffn",)))
    assert all(rank is None for rank in ffn_only.layers[0].ranks.values())


@pytest.mark.parametrize("arch", ["llama_mha", "llama_gqa", "mistral", "qwen2"])
def test_plan_counts_equal_the_model_count(arch):
    model = build_tiny_model(arch)
    plan = make_plan(model.config, PlanSettings(0.3))
    assert plan.dense_parameters == count_parameters(model)


def test_untied_head_is_counted():
    model = build_tiny_model("llama_gqa", tie_word_embeddings=False)
    assert make_plan(model.config, PlanSettings(0.3)).dense_parameters == count_parameters(model)
    assert tiny_config("llama_gqa").tie_word_embeddings


@pytest.mark.parametrize("config", [LLAMA_7B, SMOLLM2])
def test_attention_scale_sets_attentions_ratio_relative_to_the_ffns(config):
    scaled = make_plan(config, PlanSettings(0.2, attention_scale=2.0))
    attention_at_double = make_plan(config, PlanSettings(0.4))
    same_ffn = make_plan(config, PlanSettings(0.2))
    assert scaled.layers[0].ranks == attention_at_double.layers[0].ranks
    assert scaled.layers[0].ffn_width == same_ffn.layers[0].ffn_width
    with pytest.raises(LorapError, match="attention scale"):
        make_plan(config, PlanSettings(0.2, attention_scale=0))
