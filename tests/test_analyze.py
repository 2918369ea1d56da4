"""`lorap analyze`: input statistics, low-rank degrees, the verdict, and the files it writes."""
import json

import pytest
import torch

from conftest import build_tiny_model
from lorap.analyze import spectra as analyze
from lorap.cli import main


def test_rank_for_energy_counts_leading_squares():
    values = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert analyze.rank_for_energy(values, 0.5) == 1
    assert analyze.rank_for_energy(values, 0.9) == 2  # 13/14 = 0.93
    assert analyze.rank_for_energy(values, 0.95) == 3
    assert analyze.rank_for_energy(torch.tensor([1.0, 0.0, 0.0]), 0.9) == 1


@torch.no_grad()
def test_input_norms_are_root_sum_of_squares_per_sequence(tiny_tokenizer):
    from lorap.io.data import calibration_samples

    model = build_tiny_model("llama_gqa")
    batches = calibration_samples(tiny_tokenizer, "wiki", 6, 24)
    norms = analyze.input_norms(model, batches, batch_size=4)
    layer = model.model.layers[0]
    normed = layer.input_layernorm(model.model.embed_tokens(batches)).double()
    expected = (normed.pow(2).sum((0, 1)) / 6).sqrt().float()
    for name in ("q_proj", "k_proj", "v_proj"):  # all three read the same normed hidden state
        torch.testing.assert_close(norms[(0, name)], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms[(1, "gate_proj")], norms[(1, "up_proj")])
    assert len(norms) == 2 * 7 and norms[(1, "down_proj")].shape == (160,)


class _Pair(torch.nn.Module):
    def __init__(self, left, right):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        return self.left(self.right(x))


def _plant_low_rank(model, names, rank):
    """Replace `names` in every layer by exactly rank-`rank` factor pairs."""
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for name in names:
            owner = layer.self_attn if name in analyze.ATTENTION else layer.mlp
            dense = getattr(owner, name)
            right = torch.nn.Linear(dense.in_features, rank, bias=False)
            left = torch.nn.Linear(rank, dense.out_features, bias=dense.bias is not None)
            right.weight.data = torch.randn(rank, dense.in_features, generator=generator)
            left.weight.data = torch.randn(dense.out_features, rank, generator=generator) * 0.02
            setattr(owner, name, _Pair(left, right))
    return model


@pytest.mark.parametrize("planted, verdict", [(analyze.ATTENTION, "shown"), (analyze.FFN, "not shown")])
def test_verdict_follows_the_planted_structure(tiny_tokenizer, planted, verdict):
    model = _plant_low_rank(build_tiny_model("llama_gqa"), planted, rank=3)
    result = analyze.analyze_model(model, tiny_tokenizer, samples=4, seqlen=32)
    for row in result["matrices"]:
        if row["projection"] in planted:
            assert row["plain"]["rank"] <= 3 and row["weighted"]["rank"] <= 3
    found = analyze.finding(result)
    for variant in analyze.VARIANTS:
        assert found[variant]["verdict"].startswith(verdict), found[variant]["sentence"]
    assert result["by_projection"]["k_proj"]["shape"] == [32, 64]
    spectrum = result["spectra"]["q_proj"]["plain"]["normalized_singular_values"]
    assert len(spectrum) == 64 and spectrum[0] == 1.0


def test_activation_weighting_scales_input_columns(tiny_tokenizer):
    """A planted huge input channel makes the weighted spectrum of its readers nearly rank one."""
    model = build_tiny_model("llama_gqa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 1e4  # channel 5 of q/k/v input dominates
    result = analyze.analyze_model(model, tiny_tokenizer, samples=4, seqlen=32, energy=0.9)
    for row in result["matrices"]:
        if row["projection"] in ("q_proj", "k_proj", "v_proj"):
            assert row["weighted"]["rank"] == 1 < row["plain"]["rank"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("analyze") / "tiny-llama"
    build_tiny_model("llama_gqa").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_cli_writes_json_and_plots(llama_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = main(["analyze", str(llama_dir), "--out", str(out), "--samples", "4", "--sample-len", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((out / "lowrank_analysis.json").read_text())
    assert len(result["matrices"]) == 2 * 7
    assert set(result["finding"]) == {"plain", "weighted"}
    assert result["versions"]["lorap"] and result["calibration"]["samples"] == 4
    for name in ("summary", "spectra", "energy", "by_layer"):
        assert (out / f"lowrank_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "q_proj" in captured.out and "of the full rank for attention" in captured.out


def test_bad_energy_is_a_plain_error(llama_dir, tmp_path, capsys):
    code = main(["analyze", str(llama_dir), "--out", str(tmp_path / "x"), "--energy", "1.5", "--samples", "2", "--sample-len", "16"])
    assert code == 2
    assert "energy must be a fraction in (0, 1)" in capsys.readouterr().err
