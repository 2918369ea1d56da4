"""Two rivals as published: SVD-LLM (`--preset svd-llm`: every projection a factor pair truncated after
whitening, all at one truncation ratio) and ShortGPT (`--preset shortgpt`: whole decoder layers of lowest
Block Influence removed). Streaming equals the in-memory run for both (tests/test_streaming.py, every
preset), their goldens are pinned (tests/test_golden.py) and their checkpoints export (tests/test_export.py)."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model, tiny_config
from lorap import api
from lorap.cli import main
from lorap.errors import LorapError
from lorap.methods.presets import config_for
from lorap.modeling_lorap import LowRankLinear, SplitLinear
from lorap.plan.counting import count_parameters
from lorap.plan.plan import EXACT_TOLERANCE, make_plan
from test_compress import assert_reloads_without_lorap

SMALL = dict(calibration_samples=8, calibration_seqlen=32, batch_size=4, predict_speed=False)
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _saved_model(tmp_path, tokenizer, arch="llama_gqa", name="dense", **overrides):
    folder = tmp_path / name
    build_tiny_model(arch, vocab_size=len(tokenizer), **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- SVD-LLM


def test_svd_llm_whitening_truncates_with_less_error_on_the_calibration_activations_than_plain_svd(tiny_tokenizer):
    """SVD-LLM's whitening makes truncation minimise ||W X - W' X|| on the calibration inputs X: at the rank
    the preset gives each projection, its error there is below plain SVD's, for all seven projections."""
    from lorap.io.data import calibration_samples
    from lorap.methods.factorizations import plain_svd, svdllm
    from lorap.pipeline.statistics import ProjectionInputs

    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer))
    samples = calibration_samples(tiny_tokenizer, "wiki", 8, 32, 0)
    layer = model.model.layers[0]
    modules = {name: getattr(layer.self_attn if name in SEVEN[:4] else layer.mlp, name) for name in SEVEN}
    inputs = {name: [] for name in SEVEN}
    handles = [module.register_forward_pre_hook(lambda _, args, name=name: inputs[name].append(
        args[0].detach().reshape(-1, args[0].shape[-1]))) for name, module in modules.items()]
    with torch.no_grad():
        model(samples)
    for handle in handles:
        handle.remove()
    planned = make_plan(model.config, config_for("svd-llm", ratio=0.3).plan_settings()).rows
    for name, module in modules.items():
        x = torch.cat(inputs[name]).double()  # [tokens, in]
        weight = module.weight.detach().float()
        statistics = ProjectionInputs(norm=x.norm(dim=0).float(), gram=x.T @ x)
        rank = next(row["rank"] for row in planned if row["layer"] == 0 and row["module"] == name)

        def error(factors):
            left, right = factors
            return float(((weight.double() - left.double() @ right.double()) @ x.T).norm())

        whitened, plain = error(svdllm(weight, statistics, rank)), error(plain_svd(weight, statistics, rank))
        assert whitened < plain, (name, rank, whitened, plain)


def test_svd_llm_plans_one_truncation_ratio_for_all_seven_projections():
    config = tiny_config("llama_gqa", num_hidden_layers=4)
    for settings, target in ((dict(ratio=0.2), None), (dict(ratio=0.3, mode="exact"), 0.3)):
        plan = make_plan(config, config_for("svd-llm", **settings).plan_settings())
        if target is None:
            assert plan.layer_ratio == 0.2  # reference mode: the truncation ratio asked
        else:  # exact mode: the ratio whose ranks remove the asked share of the whole model
            assert abs(plan.removed_fraction - target) <= EXACT_TOLERANCE
        keep = 1 - plan.layer_ratio
        assert len(plan.rows) == 4 * 7
        for row in plan.rows:
            out_features, in_features = row["shape"]
            assert row["rank"] == math.floor(keep * out_features * in_features / (out_features + in_features) + 1e-9)
            assert row["parameters"] == row["rank"] * (out_features + in_features)
    layout = plan.layout()[0]
    assert set(SEVEN) <= set(layout) and layout["intermediate_size"] == config.intermediate_size


@pytest.mark.parametrize("arch", ["llama_gqa", "phi3"])
def test_svd_llm_makes_every_projection_a_factor_pair_and_reloads_without_lorap(arch, tiny_tokenizer, tmp_path):
    source = _saved_model(tmp_path, tiny_tokenizer, arch)
    out = tmp_path / "svd-llm"
    result = api.compress(str(source), out, preset="svd-llm", ratio=0.3, mode="exact", progress=False, **SMALL)
    assert abs(result.report["plan"]["totals"]["removed_fraction"] - 0.3) <= EXACT_TOLERANCE
    model = result.model
    for layer in model.model.layers:
        if arch == "phi3":  # the fused modules hold a pair per part
            fused = {"qkv": layer.self_attn.qkv_proj, "gate_up": layer.mlp.gate_up_proj}
            assert all(isinstance(module, SplitLinear) for module in fused.values())
            parts = [*fused["qkv"].parts.values(), *fused["gate_up"].parts.values(), layer.self_attn.o_proj,
                     layer.mlp.down_proj]
            assert len(parts) == 7 and all(isinstance(part, LowRankLinear) for part in parts)
        else:
            assert all(isinstance(getattr(layer.self_attn, n), LowRankLinear) for n in SEVEN[:4])
            assert all(isinstance(getattr(layer.mlp, n), LowRankLinear) for n in SEVEN[4:])
    assert count_parameters(model) == result.report["plan"]["totals"]["compressed_parameters"]
    layouts = json.loads((out / "config.json").read_text())["lorap"]["layers"]
    assert all(isinstance(layout[name], int) for layout in layouts for name in SEVEN)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        reloaded, _ = api.load(out)
        assert (reloaded(ids).logits - expected).abs().max() <= 1e-5
    assert_reloads_without_lorap(out, ids, expected, tmp_path)


def test_svd_llm_through_the_command_line_plan_and_compare(tiny_tokenizer, tmp_path, capsys):
    config = tmp_path / "config.json"
    tiny_config("llama_gqa", num_hidden_layers=4).save_pretrained(tmp_path)
    assert main(["plan", str(config), "--preset", "svd-llm", "--ratio", "0.3", "--mode", "exact"]) == 0
    text = capsys.readouterr().out
    assert "gate_proj" in text and "FFN: factor pairs" in text and "predicted speedup" in text
    assert main(["plan", str(config), "--preset", "svd-llm", "--ratio", "0.3", "--json", "--no-speed"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["ffn"] == "lowrank" and all(row["rank"] for row in plan["modules"])
    # Attention whitened and the FFN's channels removed: the ablation, under its own name now
    assert config_for("svd-llm-attention").ffn == "channels"


# ---------------------------------------------------------------- ShortGPT


@pytest.fixture
def near_identity_layer(tmp_path, tiny_tokenizer):
    """A 4-layer model whose layer 2 barely changes the residual stream (o_proj and down_proj scaled by 1e-3)."""
    model = build_tiny_model("llama_gqa", num_hidden_layers=4, vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _skipping(model, index):
    """A forward hook making decoder layer `index` of `model` return its input: the dense model without it."""
    return model.model.layers[index].register_forward_hook(
        lambda module, args, kwargs, output: args[0] if args else kwargs["hidden_states"], with_kwargs=True)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_shortgpt_removes_the_lowest_influence_layer_and_computes_the_dense_model_without_it(
        near_identity_layer, tmp_path, stream):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "short"
    result = api.compress(str(near_identity_layer), out, preset="shortgpt", ratio=0.25, progress=False, stream=stream,
                          **SMALL)
    assert result.report["plan"]["totals"]["removed_layers"]["layers"] == [2]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["lorap"]["removed_layers"] == [2]
    assert len(config["lorap"]["layers"]) == 3
    # Nothing else changes: the kept layers' tensors are the dense ones, renumbered
    dense_tensors = load_file(near_identity_layer / "model.safetensors")
    saved = {}
    for path in out.glob("*.safetensors"):
        saved.update(load_file(path))
    assert len(saved) == len(dense_tensors) - sum(name.startswith("model.layers.2.") for name in dense_tensors)
    renumbered = {"model.layers.0.": "model.layers.0.", "model.layers.1.": "model.layers.1.",
                  "model.layers.2.": "model.layers.3."}
    for name, tensor in saved.items():
        prefix = next((p for p in renumbered if name.startswith(p)), "")
        source = renumbered[prefix] + name[len(prefix):] if prefix else name
        assert torch.equal(tensor, dense_tensors[source]), name

    dense = AutoModelForCausalLM.from_pretrained(near_identity_layer).eval()
    _skipping(dense, 2)
    compressed, _ = api.load(out)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        expected = dense(ids).logits
        assert (compressed(ids).logits - expected).abs().max() <= 1e-5
        # generation with the KV cache: each kept layer has its own slot (renumbered layer_idx)
        prompt = ids[:1, :5]
        want = dense.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        assert torch.equal(compressed.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                               do_sample=False), want)
    if not stream:
        assert_reloads_without_lorap(out, ids, expected, tmp_path)
        # A plain smaller model: transformers loads it without the modeling file, and it generates
        plain = tmp_path / "plain"
        shutil.copytree(out, plain)
        (plain / "modeling_lorap.py").unlink()
        model = AutoModelForCausalLM.from_pretrained(plain).eval()
        assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 3
        with torch.no_grad():
            assert (model(ids).logits - expected).abs().max() <= 1e-5
            assert torch.equal(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                              do_sample=False), want)


def test_shortgpt_keeps_per_layer_config_lists_consistent(tmp_path, tiny_tokenizer):
    source = _saved_model(tmp_path, tiny_tokenizer, "qwen2", num_hidden_layers=4,
                          layer_types=["full_attention", "full_attention", "sliding_attention", "full_attention"],
                          use_sliding_window=True, sliding_window=8)
    result = api.compress(str(source), tmp_path / "short", preset="shortgpt", ratio=0.25, progress=False, **SMALL)
    (removed,) = result.report["plan"]["totals"]["removed_layers"]["layers"]
    kept = [index for index in range(4) if index != removed]
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    dense_types = ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    assert config["layer_types"] == [dense_types[index] for index in kept]
    reloaded, _ = api.load(tmp_path / "short")
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1, 2]
    assert [layer.attention_type for layer in reloaded.model.layers] == config["layer_types"]
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        assert (reloaded(ids).logits - result.model(ids).logits).abs().max() <= 1e-5


def test_shortgpt_plans_whole_layers_closest_to_the_budget_and_refuses_less_than_half_a_layer(
        tmp_path, tiny_tokenizer, capsys, monkeypatch):
    config = tiny_config("llama_gqa", num_hidden_layers=4)
    reference = make_plan(config, config_for("shortgpt", ratio=0.3).plan_settings())
    assert len(reference.removed_layers) == 1 and reference.layout() == [reference.layers[0].layout()] * 3
    one = None
    for ratio in (0.2, 0.3, 0.35, 0.5):
        plan = make_plan(config, config_for("shortgpt", ratio=ratio, mode="exact").plan_settings())
        removed = len(plan.removed_layers)
        one = one or plan.removed_fraction / removed  # every layer's share is the same
        assert all(abs(removed * one - ratio) <= abs(other * one - ratio) for other in range(0, 4))
        assert plan.removed_fraction == pytest.approx(removed * one)
    folder = tmp_path / "config.json"
    config.save_pretrained(tmp_path)
    assert main(["plan", str(folder), "--preset", "shortgpt", "--ratio", "0.3"]) == 0  # with its predicted speedup
    text = capsys.readouterr().out
    assert "1 of 4 decoder layers removed whole" in text and "placeholders" in text and "predicted speedup" in text
    for settings in (["--ratio", "0.1"], ["--ratio", "0.08", "--mode", "exact"]):
        assert main(["plan", str(folder), "--preset", "shortgpt", "--no-speed", *settings]) == 2
        assert "less than half of that" in capsys.readouterr().err
    assert main(["plan", str(folder), "--preset", "shortgpt", "--ratio", "0.9"]) == 2
    assert "every one of this model's 4" in capsys.readouterr().err

    # refused before any weight loads
    import lorap.pipeline.run as run_module

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(run_module, "load_model", no_loading)
    monkeypatch.setattr(run_module, "ShardedLayers", no_loading)
    source = _saved_model(tmp_path, tiny_tokenizer, num_hidden_layers=4)
    for stream in ([], ["--stream"]):
        assert main(["compress", str(source), "--out", str(tmp_path / "out"), "--preset", "shortgpt",
                     "--ratio", "0.1", *stream]) == 2
        assert "less than half of that" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_rivals_in_a_comparison(tmp_path, tiny_tokenizer):
    from lorap.compare.run import ComparisonSettings, compare

    source = _saved_model(tmp_path, tiny_tokenizer, num_hidden_layers=4)
    settings = ComparisonSettings(methods=("svd-llm", "shortgpt", "slicegpt"), ratios=(0.3,), seqlens=(32,), max_tokens=1024,
                                  datasets=("wiki",), tasks=(), calibration_samples=8, calibration_seqlen=32,
                                  batch_size=4)
    result = compare(str(source), tmp_path / "cmp", settings, progress=False)
    rows = {row["method"]: row for row in result["rows"]}
    assert not any("error" in row for row in rows.values())
    assert abs(rows["svd-llm"]["removed_fraction"] - 0.3) <= EXACT_TOLERANCE
    # whole layers: one of four is 21% of this model, the closest to 30%
    assert len(rows["shortgpt"]["ffn_widths"]) == 3 and 0.2 < rows["shortgpt"]["removed_fraction"] < 0.22
    assert rows["shortgpt"]["kv_cache_bytes_per_token"] == 3 / 4 * rows["svd-llm"]["kv_cache_bytes_per_token"]
    # SliceGPT runs apart from the layer walk: its row has the totals a plan's would
    assert rows["slicegpt"]["plan_totals"]["removed_fraction"] == rows["slicegpt"]["removed_fraction"] > 0.2
    assert "ShortGPT" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_removing_layers_makes_one_scoring_pass_and_collects_no_gram_matrix():
    config = config_for("shortgpt", ratio=0.3, factorization="svdllm", ffn_update="lstsq")  # parts that do not apply
    assert config.gram_sources() == () and config.whole_model_parts() == ["layer allocation remove-layers"]
    with pytest.raises(LorapError, match="choose from uniform, block-influence, remove-layers"):
        config_for("shortgpt", ratio=0.3, layer_allocation="nonesuch").validate()
