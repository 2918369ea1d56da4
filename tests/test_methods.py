"""Named methods (the paper, the best preset, baselines, ablations) and `lorap compare`."""
import json
import math

import pytest
import torch

from conftest import build_tiny_model
from lorap import api
from lorap.pipeline.run import compress_model
from lorap.pipeline.config import CompressionConfig
from lorap.plan.counting import count_parameters
from lorap.errors import LorapError
from lorap.methods.presets import METHODS, config_for
from test_compress import assert_reloads_without_lorap

SMALL = dict(calibration_samples=8, calibration_seqlen=32, batch_size=4)


@pytest.fixture
def gqa_dir(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny-gqa"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_the_paper_preset_is_the_default_configuration():
    # As published: AWSVD pairs with a = 3, the LoRAP channel score keeping the lowest 1%, nothing
    # compensating removed channels, the same ratio in every layer, exact integer shapes.
    published = dict(factorization="awsvd", allocation_a=3.0, bottom_keep=0.01, sublayers=("attention", "ffn"),
                     ffn_score="lorap", ffn_update="none", ffn_allocation="uniform", rank_allocation="rule",
                     attention="lowrank", attention_scale=1.0, align=1, mode="reference")
    defaults = CompressionConfig()
    assert {key: getattr(defaults, key) for key in published} == published
    assert config_for("paper", ratio=0.3) == CompressionConfig(ratio=0.3)


def test_options_override_a_preset_and_unknown_names_are_refused():
    config = config_for("flap", ratio=0.3, ffn_update="lstsq", bottom_keep=None)
    assert (config.ffn_score, config.ffn_allocation, config.ffn_update, config.bottom_keep) == ("flap", "adaptive", "lstsq", 0.0)
    assert config.preset == "flap"
    with pytest.raises(LorapError, match="unknown method"):
        config_for("sparsegpt")


# The serving preset's FFN widths are multiples of 256: the tiny FFN (160) has no width to remove.
WIDER_FFN = {"serving": dict(intermediate_size=1024)}


# SliceGPT rotates the whole stream outside the layer walk (tests/test_slicegpt.py)
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"slicegpt"}))
def test_every_method_compresses_to_its_plan(name, tiny_tokenizer):
    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer), **WIDER_FFN.get(name, {}))
    dense = count_parameters(model)
    config = config_for(name, ratio=0.3, **SMALL)
    result = compress_model(model, tiny_tokenizer, config, progress=False)  # raises if the count differs from the plan
    assert count_parameters(model) == result.plan.compressed_parameters
    assert result.plan.layer_ratio == 0.3
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 500, (2, 16))).logits).all()
    assert count_parameters(model) < dense


def test_adaptive_widths_differ_by_layer_and_keep_the_total(tiny_tokenizer):
    uniform = compress_model(build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)), tiny_tokenizer,
                             config_for("paper", ratio=0.4, **SMALL), progress=False).plan
    adaptive = compress_model(build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer), num_hidden_layers=4),
                              tiny_tokenizer, config_for("adaptive", ratio=0.4, **SMALL), progress=False).plan
    widths = [layer.ffn_width for layer in adaptive.layers]
    assert len(set(widths)) > 1
    assert sum(widths) == 4 * uniform.layers[0].ffn_width


@pytest.mark.parametrize("name", ["flap", "lstsq"])
def test_compensated_checkpoints_reload_with_their_new_biases(name, gqa_dir, tmp_path):
    out = tmp_path / "out"
    result = api.compress(str(gqa_dir), out, preset=name, ratio=0.4, progress=False, **SMALL)
    layers = json.loads((out / "config.json").read_text())["lorap"]["layers"]
    assert all(layer["down_proj_bias"] for layer in layers)
    model = result.model
    assert all(layer.mlp.down_proj.bias is not None for layer in model.model.layers)
    inputs = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        expected = model(inputs).logits
    reloaded, _ = api.load(out)
    assert count_parameters(reloaded) == result.report["plan"]["totals"]["compressed_parameters"]
    with torch.no_grad():
        assert (reloaded(inputs).logits - expected).abs().max() <= 1e-5
    assert_reloads_without_lorap(out, inputs, expected, tmp_path)


def test_the_plan_counts_the_added_biases():
    from lorap.plan.plan import PlanSettings, make_plan

    from conftest import tiny_config

    config = tiny_config("llama_gqa")
    plain = make_plan(config, PlanSettings(0.3))
    biased = make_plan(config, PlanSettings(0.3, ffn_update="bias"))
    assert biased.compressed_parameters - plain.compressed_parameters == config.num_hidden_layers * config.hidden_size


def test_taylor_scores_are_the_group_sum_of_weight_times_gradient(tiny_tokenizer):
    from lorap.methods.head_pruning import HeadLayout
    from lorap.methods.taylor import taylor_channel_scores

    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer))
    samples = torch.randint(0, len(tiny_tokenizer), (4, 16))
    layout = HeadLayout(kv_heads=2, heads_per_group=2, head_dim=16)
    scores = taylor_channel_scores(model, samples, batch_size=2, device="cpu", progress=False, scored=("ffn", "heads"),
                                   layout=layout)
    # By hand: one loss per batch of 2, gradients summed over the batches.
    model.zero_grad()
    for start in (0, 2):
        model(input_ids=samples[start : start + 2], labels=samples[start : start + 2]).loss.backward()

    def salience(linear, dim):
        return (linear.weight * linear.weight.grad).abs().sum(dim).detach()

    mlp, attention = model.model.layers[1].mlp, model.model.layers[1].self_attn
    expected = salience(mlp.gate_proj, 1) + salience(mlp.up_proj, 1) + salience(mlp.down_proj, 0)
    assert torch.allclose(scores[1]["ffn"], expected, rtol=1e-4, atol=1e-8)
    # a query channel: its q row and o column, and half (2 query heads per KV head) of the k and v rows it reads
    shared = (salience(attention.k_proj, 1) + salience(attention.v_proj, 1)).reshape(2, 1, 16).expand(2, 2, 16)
    expected = salience(attention.q_proj, 1) + salience(attention.o_proj, 0) + shared.flatten() / 2
    assert torch.allclose(scores[1]["heads"], expected, rtol=1e-4, atol=1e-8)


def test_taylor_leaves_no_gradients_and_restores_requires_grad(tiny_tokenizer):
    from lorap.methods.taylor import taylor_channel_scores

    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer))
    model.model.embed_tokens.weight.requires_grad_(False)
    taylor_channel_scores(model, torch.randint(0, 500, (2, 8)), 2, "cpu", progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad and model.model.layers[0].mlp.up_proj.weight.requires_grad


def test_compare_ranks_methods_under_one_budget_and_resumes(gqa_dir, tmp_path, monkeypatch):
    from lorap.compare import run as compare_module
    from lorap.compare.run import ComparisonSettings, compare

    # The out-of-domain corpus: here the docstrings of a few standard modules (the real one is pydocs).
    import argparse, collections, json as json_module, pathlib as pathlib_module, textwrap

    docs = tmp_path / "pydocs"
    for module in (argparse, collections, json_module, pathlib_module, textwrap):
        (docs / module.__name__).mkdir(parents=True)
        (docs / module.__name__ / "index.rst.txt").write_text((module.__doc__ or "") * 20, encoding="utf-8")
    monkeypatch.setenv("LORAP_PYDOCS_DIR", str(docs))
    settings = ComparisonSettings(methods=("paper", "svd-magnitude", "attention-only"), ratios=(0.3, 0.5), seqlens=(32,),
                                  max_tokens=2048, tasks=(), **SMALL)
    assert settings.datasets == ("wiki", "pydocs")
    result = compare(str(gqa_dir), tmp_path / "cmp", settings, progress=False)
    rows = {(r["method"], r["ratio"]): r for r in result["rows"]}
    for ratio in (0.3, 0.5):
        done = [r for (m, q), r in rows.items() if q == ratio and "error" not in r]
        removed = [r["removed_parameters"] for r in done]
        assert max(removed) - min(removed) <= 0.02 * result["dense"]["parameters"]  # one budget
    # Attention is a fifth of this tiny model: removing 30% or 50% from it alone is reported, not faked.
    assert "error" in rows[("attention-only", 0.5)] and "can be removed from its attention" in rows[("attention-only", 0.5)]["error"]
    assert all("error" not in r for (m, q), r in rows.items() if m != "attention-only")
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "cannot reach this budget" in table and (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    ranked = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(ranked) == 4  # paper and plain SVD + magnitude, at each ratio
    dense = result["dense"]["perplexity"]
    assert set(dense) == {"wiki", "pydocs"} and all(set(by) == {"32"} for by in dense.values())

    def relative(row):  # geometric mean over the two corpora of perplexity / dense perplexity
        return math.sqrt(math.prod(row["perplexity"][d]["32"] / dense[d]["32"] for d in dense))

    scored = sorted((relative(r), r["method"]) for (m, q), r in rows.items() if q == 0.3 and "error" not in r)
    first = next(line for line in table.splitlines() if line.startswith(f"| 1 | {METHODS[scored[0][1]].label} |"))
    cells = first.rstrip(" |").split(" | ")
    assert cells[-3] == f"{scored[0][0]:.2f}x"  # the 'vs dense' column, before the KV cache and compress time
    # low-rank attention keeps the KV cache: 2 layers x (k + v) x 2 KV heads x 16 dims x 4 bytes
    assert cells[-2] == "512" and rows[(scored[0][1], 0.3)]["kv_cache_bytes_per_token"] == 512
    assert "| wiki @ 32 | pydocs @ 32 | vs dense @ 32 |" in table

    # A second run with the same settings reuses every row; a changed setting redoes them.
    def no_compression(*args, **kwargs):
        raise AssertionError("a saved row was recomputed")

    monkeypatch.setattr(compare_module, "_method_row", no_compression)
    again = compare(str(gqa_dir), tmp_path / "cmp", settings, progress=False)
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in result["rows"]]
    assert result["reused_rows"] == [] and len(again["reused_rows"]) == len(result["rows"]) + 1  # and the dense row
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["reused_rows"] == again["reused_rows"]
    settings.seed = 1
    with pytest.raises(AssertionError, match="recomputed"):
        compare(str(gqa_dir), tmp_path / "cmp", settings, progress=False)
    settings.seed, settings.split = 0, "validation"  # other tokens: other rows
    with pytest.raises(AssertionError, match="recomputed"):
        compare(str(gqa_dir), tmp_path / "cmp", settings, progress=False)


def test_comparison_table_names_a_text_file_corpus_by_its_stem():
    from lorap.compare.report import comparison_markdown

    fortunes = "/cache/corpora/fortunes/fortunes.txt"
    scores = {"wiki": {"32": 10.0}, "pydocs": {"32": 20.0}, fortunes: {"32": 40.0}}
    result = {"source": "tiny", "settings": {"calibration_samples": 4, "calibration_seqlen": 32,
                                             "calibration_source": "wiki", "seed": 0, "ratios": [0.5]},
              "evaluation": {"seqlens": [32], "datasets": ["wiki", "pydocs", fortunes], "max_tokens": 64, "tasks": []},
              "dense": {"parameters": 100, "perplexity": scores},
              "rows": [{"method": "paper", "label": "LoRAP (paper)", "attention": "a", "ffn": "f", "ratio": 0.5,
                        "parameters": 50, "removed_fraction": 0.5, "compress_seconds": 1.0,
                        "perplexity": {name: {"32": 2 * value["32"]} for name, value in scores.items()}}]}
    table = comparison_markdown(result)
    assert "of `wiki`, `pydocs` and `fortunes` (`fortunes`: /cache/corpora/fortunes/fortunes.txt)" in table
    assert "| wiki @ 32 | pydocs @ 32 | fortunes @ 32 | vs dense @ 32 |" in table
    assert "| 80.00 | 2.00x |" in table  # the file's perplexity, and twice dense on every corpus
    assert "lorap best" not in table  # no best row, nothing to say about it


def test_comparison_table_says_where_a_rival_beats_best():
    from lorap.compare.report import comparison_markdown

    def row(method, label, perplexity, cache):
        return {"method": method, "label": label, "attention": "a", "ffn": "f", "ratio": 0.2, "parameters": 80,
                "removed_fraction": 0.2, "compress_seconds": 1.0, "kv_cache_bytes_per_token": cache,
                "perplexity": {name: {"32": value} for name, value in perplexity.items()}}

    result = {"source": "tiny", "settings": {"calibration_samples": 4, "calibration_seqlen": 32,
                                             "calibration_source": "wiki", "seed": 0, "ratios": [0.2]},
              "evaluation": {"seqlens": [32], "datasets": ["wiki", "pydocs"], "max_tokens": 64, "tasks": []},
              "dense": {"parameters": 100, "perplexity": {"wiki": {"32": 10.0}, "pydocs": {"32": 20.0}}},
              "rows": [row("best", "lorap best", {"wiki": 12.0, "pydocs": 30.0}, 100),
                       row("modegpt", "MoDeGPT", {"wiki": 20.0, "pydocs": 29.5}, 75),
                       row("svd-llm", "SVD-LLM", {"wiki": 40.0, "pydocs": 60.0}, 100)]}
    table = comparison_markdown(result)
    assert ("Lower perplexity than lorap best: MoDeGPT on `pydocs` @ 32 (29.50 against 30.00). "
            "A smaller KV cache than best's 100 bytes per token: MoDeGPT (75).") in table
    result["rows"][1]["perplexity"]["pydocs"]["32"] = 31.0
    result["rows"][1]["kv_cache_bytes_per_token"] = 100
    assert "No other row scores lower perplexity than lorap best on any corpus at any window length.\n" in comparison_markdown(result)


def test_compare_on_validation_refuses_test_zero_shot_items():
    from lorap.compare.run import ComparisonSettings

    with pytest.raises(LorapError, match="add --tasks none"):
        ComparisonSettings(methods=("paper",), split="validation", tasks=("proxies",)).validate()
    ComparisonSettings(methods=("paper",), split="validation", tasks=()).validate()



def test_cli_presets_and_options_reach_the_plan(tmp_path, capsys):
    from conftest import tiny_config
    from lorap.cli import main

    tiny_config("llama_gqa").save_pretrained(tmp_path)
    config = str(tmp_path / "config.json")

    def planned(*options):
        assert main(["plan", config, "--ratio", "0.3", "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)

    paper, best = planned(), planned("--preset", "best")
    assert paper["settings"]["ffn_update"] == "none" and best["settings"]["ffn_update"] == "lstsq"
    assert paper["settings"]["align"] == 1 and best["settings"]["align"] > 1  # best aligns by default
    unaligned = planned("--preset", "best", "--align", "1")
    added = unaligned["totals"]["compressed_parameters"] - paper["totals"]["compressed_parameters"]
    assert added == 2 * 64  # one new down-projection bias per layer (2 layers, hidden 64)
    assert planned("--preset", "best", "--align", "1", "--ffn-update", "none")["totals"] == paper["totals"]
    with pytest.raises(SystemExit):  # argparse lists the presets
        main(["plan", config, "--ratio", "0.3", "--preset", "nonesuch"])


def test_memory_estimate_counts_gram_matrices_and_the_scoring_pass_of_a_streamed_preset(tmp_path, capsys):
    from conftest import tiny_config
    from lorap.cli import main

    tiny_config("llama_gqa").save_pretrained(tmp_path)

    def estimate(*options):
        assert main(["plan", str(tmp_path / "config.json"), "--ratio", "0.3", "--json", *options]) == 0
        return json.loads(capsys.readouterr().out)["memory_estimate"]

    paper, whitened, best = estimate(), estimate("--preset", "svd-llm-attention"), estimate("--preset", "best")
    assert paper["gram_bytes"] == 0 and whitened["gram_bytes"] == 2 * 8 * 64**2  # q and o inputs, float64
    assert best["gram_bytes"] == whitened["gram_bytes"] + 8 * 160**2  # and the FFN's down input
    assert whitened["streaming_peak_bytes"] > paper["streaming_peak_bytes"]
    assert best["streaming_peak_bytes"] >= whitened["streaming_peak_bytes"]
    assert best["whole_model_parts"] == "ffn allocation adaptive"
    assert main(["plan", str(tmp_path / "config.json"), "--ratio", "0.3", "--preset", "best"]) == 0
    assert "after a scoring pass over the shards for ffn allocation adaptive" in capsys.readouterr().out
