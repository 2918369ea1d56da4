"""Head pruning (--attention heads): whole KV groups removed with their query heads.

Every supported family with per-layer head counts (LLaMA with and without GQA, Mistral, Qwen2 with
q/k/v biases, Gemma with a head_dim of its own): the compressed model matches its plan, reloads
without lorap to the same logits, generates, and really caches fewer keys and values. The
criteria pick the groups they should, and the compensation does what it says.
"""
import pytest
import torch

from conftest import build_tiny_model, tiny_config
from lorap import api
from lorap.cli import main
from lorap.errors import LorapError
from lorap.evaluate.efficiency import counted_macs_per_token, kv_cache_bytes_per_token, macs_per_token
from lorap.methods.head_pruning import HeadLayout, head_scores, kept_groups, prune_heads
from lorap.methods.presets import config_for
from lorap.methods.registry import HEAD_SCORES
from lorap.pipeline.layer_step import AttentionView
from lorap.pipeline.run import compress_model
from lorap.pipeline.statistics import ProjectionInputs
from lorap.plan.counting import count_parameters
from lorap.plan.plan import PlanSettings, make_plan
from test_compress import assert_reloads_without_lorap

SMALL = dict(calibration_samples=8, calibration_seqlen=32, batch_size=4)
FAMILIES = ["llama_mha", "llama_gqa", "mistral", "qwen2", "gemma"]


def _cached_kv_heads(model, inputs) -> list:
    with torch.no_grad():
        cache = model(inputs, use_cache=True).past_key_values
    return [cache.layers[i].keys.shape[1] for i in range(len(cache.layers))]


@pytest.mark.parametrize("arch", FAMILIES)
def test_head_pruned_checkpoints_match_their_plan_and_reload_without_lorap(arch, tmp_path, tiny_tokenizer):
    """With FLAP's bias compensation, so that o_proj also gains a bias the modeling file must build."""
    update = "bias"
    folder = tmp_path / "dense"
    build_tiny_model(arch).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    inputs = torch.randint(0, 500, (2, 12))
    dense_kv = _cached_kv_heads(build_tiny_model(arch), inputs)

    out = tmp_path / "heads"
    result = api.compress(str(folder), out, ratio=0.4, attention="heads", head_update=update, progress=False, **SMALL)
    plan, layouts = result.report["plan"], result.model.config.lorap["layers"]
    groups = tiny_config(arch).num_key_value_heads
    kept = round(0.6 * groups)  # the nearest whole number of groups to 60%
    assert [layout["num_key_value_heads"] for layout in layouts] == [kept] * len(layouts)
    assert count_parameters(result.model) == plan["totals"]["compressed_parameters"]
    assert _cached_kv_heads(result.model, inputs) == [kept] * len(dense_kv) and kept < dense_kv[0]
    cache = plan["totals"]["kv_cache_values_per_token"]
    assert cache["compressed"] * groups == cache["dense"] * kept
    assert all(layout.get("o_proj_bias", False) == (update != "none") for layout in layouts)

    with torch.no_grad():
        expected = result.model(inputs).logits
    reloaded, _ = api.load(out)
    with torch.no_grad():
        assert (reloaded(inputs).logits - expected).abs().max() <= 1e-5
    generated = reloaded.generate(inputs[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 16)
    assert_reloads_without_lorap(out, inputs, expected, tmp_path)


@pytest.mark.parametrize("update", ["none", "lstsq"])
def test_every_head_update_compresses_to_its_plan(update, tiny_tokenizer):
    model = build_tiny_model("llama_gqa")
    result = compress_model(model, tiny_tokenizer, config_for("paper", ratio=0.4, attention="heads", head_update=update,
                                                              **SMALL), progress=False)
    assert count_parameters(model) == result.plan.compressed_parameters
    assert all(layer.o_bias_added == (update == "lstsq") for layer in result.plan.layers)
    assert model.model.layers[0].self_attn.o_proj.in_features == 32
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 500, (2, 16))).logits).all()
    # eval's efficiency figures count each layer's own heads: shapes agree with torch's flop counter
    assert macs_per_token(model, 32)["total"] == pytest.approx(counted_macs_per_token(model, 32), rel=1e-9)
    assert kv_cache_bytes_per_token(model) == 2 * 2 * 16 * 4  # 2 layers x (k + v) x 1 KV head x 16 dims x fp32


def test_fused_attention_cannot_take_head_counts_and_says_what_to_use(tiny_tokenizer):
    model = build_tiny_model("phi3")
    with pytest.raises(LorapError, match="per-layer head counts.*--attention lowrank"):
        compress_model(model, tiny_tokenizer, config_for("paper", ratio=0.3, attention="heads", **SMALL), progress=False)


def test_a_budget_that_would_remove_every_head_is_refused():
    with pytest.raises(LorapError, match="every head of a layer"):
        make_plan(tiny_config("llama_gqa"), PlanSettings(0.8, attention="heads"))
    # exact mode keeps one group in every layer, and says when the budget cannot be met that way
    with pytest.raises(LorapError, match="at most"):
        make_plan(tiny_config("llama_gqa"), PlanSettings(0.85, mode="exact", attention="heads"))


def test_exact_mode_meets_the_budget_with_whole_groups():
    config = tiny_config("llama_mha", num_hidden_layers=4, intermediate_size=400)
    plan = make_plan(config, PlanSettings(0.3, mode="exact", attention="heads"))
    assert abs(plan.removed_fraction - 0.3) <= 0.002
    assert {layer.kv_heads for layer in plan.layers} <= {1, 2, 3}
    assert all(row["shape"][0] == row["heads"] * 16 for row in plan.rows if row["module"] == "q_proj")


def test_adaptive_ranks_need_factor_pairs():
    with pytest.raises(LorapError, match="--rank-allocation rule"):
        config_for("paper", ratio=0.2, attention="heads", rank_allocation="adaptive").validate()


class _Attention:
    """Linears standing in for a layer's q/k/v/o (4 query heads in 2 groups, head_dim 3)."""

    def __init__(self, weak_group: int):
        torch.manual_seed(0)
        layout = HeadLayout(kv_heads=2, heads_per_group=2, head_dim=3)
        self.q_proj, self.k_proj = torch.nn.Linear(8, 12), torch.nn.Linear(8, 6)
        self.v_proj, self.o_proj = torch.nn.Linear(8, 6), torch.nn.Linear(12, 8, bias=False)
        weak = torch.tensor([weak_group])
        with torch.no_grad():  # the weak group's weights are a hundredth of the others'
            self.q_proj.weight[layout.query_channels(weak)] *= 0.01
            self.k_proj.weight[layout.kv_channels(weak)] *= 0.01
            self.v_proj.weight[layout.kv_channels(weak)] *= 0.01
            self.o_proj.weight[:, layout.query_channels(weak)] *= 0.01
        self.layout = layout


def _o_inputs(samples: torch.Tensor) -> ProjectionInputs:
    mean = samples.double().mean(0)
    return ProjectionInputs(norm=samples.norm(dim=0), mean=mean, variance=samples.double().var(0),
                            gram=samples.double().T @ samples.double(), tokens=samples.shape[0])


@pytest.mark.parametrize("criterion", [spec.name for spec in HEAD_SCORES if spec.implementation is not None])
@pytest.mark.parametrize("weak_group", [0, 1])
def test_every_criterion_removes_the_group_that_matters_least(criterion, weak_group):
    attention = _Attention(weak_group)
    scores = head_scores(attention, _o_inputs(torch.randn(64, 12)), attention.layout, criterion)
    assert kept_groups(scores, 1).tolist() == [1 - weak_group]


def test_kept_groups_are_in_their_original_order():
    assert kept_groups(torch.tensor([3.0, 1.0, 2.0, 5.0]), 3).tolist() == [0, 2, 3]


def test_compensation_keeps_the_mean_output_and_the_refit_fits_better():
    attention = _Attention(weak_group=0)
    samples = torch.randn(256, 12) + torch.linspace(-1, 1, 12)  # inputs of o_proj with non-zero means
    samples[:, 6:] += 0.5 * samples[:, :6]  # the kept heads' channels correlate with the removed ones
    inputs, keep = _o_inputs(samples), torch.tensor([1])
    kept_channels = attention.layout.query_channels(keep)
    dense = attention.o_proj(samples).detach()
    errors = {}
    for update in ("none", "bias", "lstsq"):
        o_proj = prune_heads(attention, keep, attention.layout, update, _o_inputs(samples))["o_proj"]
        output = o_proj(samples[:, kept_channels]).detach()
        if update != "none":
            assert torch.allclose(output.mean(0), dense.mean(0), atol=1e-5)
        errors[update] = (output - dense).pow(2).mean().item()
    assert errors["lstsq"] < errors["bias"] < errors["none"]
    assert inputs.tokens == 256


def test_plan_shows_heads_and_the_kv_cache(capsys):
    main(["plan", "--ratio", "0.2", "--attention", "heads", "--no-speed"])
    out = capsys.readouterr().out
    assert "attention: whole KV groups removed" in out and "2 kv heads" in out and "6 heads" in out
    assert "KV cache: keys and values per token" in out and "11,520" in out and "7,680" in out
    main(["plan", "--ratio", "0.2", "--no-speed"])  # low rank keeps every KV head, and says so
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV cache"))
    assert line.split()[-3:] == ["11,520", "11,520", "0.0%"]
    assert main(["plan", "--ratio", "0.9", "--attention", "heads", "--no-speed"]) == 2
    assert "every head of a layer" in capsys.readouterr().err


def test_adaptive_allocation_spreads_heads_and_channels_over_layers_within_the_budget(tiny_tokenizer):
    """FLAP's structure across attention and FFN: one pool of groups and channels, the budget met exactly."""
    model = build_tiny_model("llama_mha", num_hidden_layers=4, intermediate_size=400)
    config = config_for("paper", ratio=0.3, mode="exact", attention="heads", head_update="bias",
                        ffn_allocation="adaptive", ffn_update="bias", bottom_keep=0.0, **SMALL)
    result = compress_model(model, tiny_tokenizer, config, progress=False)
    plan = result.plan
    assert count_parameters(model) == plan.compressed_parameters
    assert abs(plan.removed_fraction - 0.3) <= 0.002
    kept = [layer.kv_heads for layer in plan.layers]
    assert min(kept) >= 1 and len(set(kept)) > 1  # layers keep different numbers of heads
    assert [layer.self_attn.k_proj.out_features // 16 for layer in model.model.layers] == kept
    assert "adaptive_scoring" in result.timings


def test_taylor_scores_heads_and_channels_in_one_gradient_pass(tiny_tokenizer, monkeypatch):
    import lorap.methods.taylor as taylor

    passes = []
    original = taylor.taylor_channel_scores
    monkeypatch.setattr(taylor, "taylor_channel_scores", lambda *a, **k: passes.append(a[5]) or original(*a, **k))
    model = build_tiny_model("llama_gqa")
    config = config_for("paper", ratio=0.4, attention="heads", head_score="llm-pruner-taylor",
                        ffn_score="llm-pruner-taylor", **SMALL)
    result = compress_model(model, tiny_tokenizer, config, progress=False)
    assert passes == [("ffn", "heads")]
    assert count_parameters(model) == result.plan.compressed_parameters
    assert [layer.self_attn.k_proj.out_features for layer in model.model.layers] == [16, 16]


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_recovery_trains_a_head_pruned_checkpoint_and_keeps_its_shapes(full, tmp_path, tiny_tokenizer):
    from lorap.io.data import wiki_documents
    from lorap.recover.run import recover

    folder = tmp_path / "dense"
    build_tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    api.compress(str(folder), tmp_path / "heads", preset="wanda-sp", head_update="bias", ratio=0.4, progress=False,
                 predict_speed=False, **SMALL)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(wiki_documents("train")[:60]))
    result = recover(tmp_path / "heads", tmp_path / "recovered", data=str(corpus), max_steps=4, full=full, cutoff=64,
                     val_size=8, batch_size=4, lr=2e-2, eval_every=2, save_every=2, progress=False)
    assert result.report["best_validation_loss"] < result.report["validation_loss_before"]
    source, _ = api.load(tmp_path / "heads")
    reloaded, _ = api.load(tmp_path / "recovered")
    assert {n: p.shape for n, p in reloaded.named_parameters()} == {n: p.shape for n, p in source.named_parameters()}
    assert reloaded.config.lorap["layers"] == source.config.lorap["layers"]
    assert [layer.self_attn.k_proj.out_features for layer in reloaded.model.layers] == [16, 16]  # one group of two
    assert reloaded.model.layers[0].self_attn.o_proj.bias is not None
