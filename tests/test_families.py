"""Families added through the architecture adapter alone: Phi-3 (fused qkv_proj and gate_up_proj)
and Gemma (head_dim apart from hidden/heads, scaled embeddings, GeLU FFN). Plan, compress, eval,
reload and generate, by the command line as a user would. (The tests parametrized over every tiny
architecture cover them too: round trips without lorap, streaming, golden outputs.)"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model
from lorap import api
from lorap.architectures import Architecture
from lorap.cli import main
from lorap.io.data import evaluation_windows
from lorap.modeling_lorap import LowRankLinear, SplitLinear

FAMILIES = ("phi3", "gemma")
SMALL = ["--samples", "8", "--sample-len", "32", "--batch-size", "4"]


@pytest.fixture(params=FAMILIES)
def family_dir(request, tmp_path, tiny_tokenizer):
    folder = tmp_path / request.param
    build_tiny_model(request.param, vocab_size=len(tiny_tokenizer), max_position_embeddings=2048).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_plan_compress_eval_and_generate(family_dir, tmp_path, capsys):
    assert main(["plan", str(family_dir), "--ratio", "0.3", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert main(["compress", str(family_dir), "--ratio", "0.3", "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["plan"]["totals"] == plan["totals"]

    model, tokenizer = api.load(out)
    assert sum(p.numel() for p in model.parameters()) == plan["totals"]["compressed_parameters"]
    prompt = tokenizer("The history of", return_tensors="pt", return_token_type_ids=False)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5

    capsys.readouterr()
    assert main(["eval", str(out), "--seqlen", "32", "--max-tokens", "512", "--tasks", "none",
                 "--json", str(tmp_path / "eval.json")]) == 0
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    compressed, base = evaluation, evaluation["against"]  # compared with its base model by default
    assert (compressed["parameters"], base["parameters"]) == (
        plan["totals"]["compressed_parameters"], plan["totals"]["dense_parameters"])
    # Both perplexities are the ones computed here, apart from lorap's evaluation code, from each
    # model's logits over the same windows (the test split's first 512 tokens, 16 windows of 32).
    windows = evaluation_windows(tokenizer, "wiki", 32, 512)
    base_model = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    for entry, scored in ((compressed, model), (base, base_model)):
        assert entry["perplexity"]["wiki"]["32"] == pytest.approx(_perplexity(scored, windows), rel=1e-5)


def _perplexity(model, windows) -> float:
    """exp(mean NLL of every window's tokens 2..L given the ones before), in float64."""
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


def test_phi3_fused_projections_keep_their_layout(tiny_tokenizer):
    """q, k, v are compressed apart (the a:1 rule needs them apart), so qkv_proj becomes a SplitLinear
    of a factor pair or a linear per part; gate and up lose the same channels and stay one linear."""
    from lorap.methods.presets import config_for
    from lorap.pipeline.run import compress_model

    model = build_tiny_model("phi3", vocab_size=len(tiny_tokenizer))
    dense = build_tiny_model("phi3", vocab_size=len(tiny_tokenizer))
    result = compress_model(model, tiny_tokenizer, config_for("paper", ratio=0.5, calibration_samples=8,
                                                              calibration_seqlen=32), progress=False)
    architecture = Architecture(model.config)
    for layer, dense_layer, layer_plan in zip(model.model.layers, dense.model.layers, result.plan.layers):
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv, SplitLinear) and list(qkv.parts) == ["q_proj", "k_proj", "v_proj"]
        for name, part in qkv.parts.items():
            rank = layer_plan.ranks[name]
            assert (part.rank if isinstance(part, LowRankLinear) else None) == rank
        gate_up = layer.mlp.gate_up_proj
        assert type(gate_up) is torch.nn.Linear and gate_up.out_features == 2 * layer_plan.ffn_width
        # the gate half and the up half keep the same channels of the dense fused weight
        gate, up = architecture.projection(layer, "gate_proj"), architecture.projection(layer, "up_proj")
        dense_gate = dense_layer.mlp.gate_up_proj.weight[: model.config.intermediate_size]
        dense_up = dense_layer.mlp.gate_up_proj.weight[model.config.intermediate_size :]
        kept = [int((dense_gate == row).all(1).nonzero()) for row in gate.weight]
        assert torch.equal(dense_up[kept], up.weight)


def test_checkpoints_from_before_the_adapter_still_load(tmp_path, tiny_tokenizer):
    """Checkpoints written before config.lorap recorded the architecture have LLaMA's names."""
    folder = tmp_path / "dense"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = api.compress(str(folder), tmp_path / "out", ratio=0.4, progress=False, calibration_samples=8,
                          calibration_seqlen=32)
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    del config["lorap"]["architecture"]
    config_file.write_text(json.dumps(config))
    # unfused: the fused q/k/v GEMM sums in another order, so only the unfused model is bit-identical
    reloaded, _ = api.load(tmp_path / "out", fuse=False)
    fused, _ = api.load(tmp_path / "out")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        expected = result.model(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        torch.testing.assert_close(fused(ids).logits, expected, rtol=1e-5, atol=1e-5)
