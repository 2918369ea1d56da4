"""`lorap plan` and `lorap compress` from the command line, and compression of the real default model."""
import json

import pytest

from lorap.cli import main

LLAMA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


@pytest.fixture
def llama7b_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_7B))
    return path


def test_plan_prints_the_reference_figures(llama7b_config, capsys):
    # --no-speed: the prediction would time LLaMA-7B layers (a minute here); test_predict covers it
    assert main(["plan", str(llama7b_config), "--ratio", "0.2", "--no-speed"]) == 0
    table = capsys.readouterr().out
    assert "rank 1228" in table and "width 8807" in table and "19.22%" in table
    assert main(["plan", str(llama7b_config), "--ratio", "0.5", "--json", "--no-speed"]) == 0
    plan = json.loads(capsys.readouterr().out)
    q = next(row for row in plan["modules"] if row["module"] == "q_proj")
    v = next(row for row in plan["modules"] if row["module"] == "v_proj")
    gate = next(row for row in plan["modules"] if row["module"] == "gate_proj")
    assert (q["rank"], v["rank"], gate["width"]) == (512, 1536, 5504)


@pytest.mark.parametrize("ratio", ["0", "0.95", "-1"])
def test_ratio_out_of_range_is_a_clear_error(llama7b_config, capsys, ratio):
    assert main(["plan", str(llama7b_config), "--ratio", ratio]) == 2
    assert "ratio must be in (0, 0.9]" in capsys.readouterr().err


def test_compress_command_with_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "compress", str(tiny_model_dir), "--ratio", "0.3", "--mode", "exact", "--out", str(out),
            "--samples", "8", "--sample-len", "32", "--eval", "--eval-seqlen", "32", "--eval-max-tokens", "2048",
            "--json", str(tmp_path / "report.json"),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "compression_report.json").read_text())
    assert json.loads((tmp_path / "report.json").read_text())["plan"] == report["plan"]
    totals = report["plan"]["totals"]
    assert abs(totals["removed_fraction"] - 0.3) <= 0.002
    assert f"{totals['compressed_parameters']:,}" in printed
    evaluation = report["evaluation"]
    assert evaluation["compressed"]["parameters"] == totals["compressed_parameters"]
    assert evaluation["dense"]["parameters"] == totals["dense_parameters"]
    assert set(evaluation["dense"]["perplexity"]["wiki"]) == {"32"}
    assert {"load", "calibration_data", "layer_walk", "save", "total"} <= set(report["timings"])


def test_compress_refuses_non_empty_output(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    assert main(["compress", str(tiny_model_dir), "--ratio", "0.3", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_the_real_default_model(tmp_path, default_model_dir):
    import lorap

    result = lorap.compress(
        None,
        tmp_path / "smollm2-20",
        ratio=0.2,
        calibration_samples=16,
        calibration_seqlen=64,
        evaluate_ppl=["wiki"],
        eval_max_tokens=2048,
        progress=False,
        predict_speed=False,  # it would time the real model's layers; test_predict covers the prediction
    )
    totals = result.report["plan"]["totals"]
    assert totals["dense_parameters"] == 134_515_008
    assert totals["compressed_parameters"] == 113_277_888  # reference mode: 15.79% of the whole model
    ppl = result.report["evaluation"]
    dense, compressed = ppl["dense"]["perplexity"]["wiki"]["128"], ppl["compressed"]["perplexity"]["wiki"]["128"]
    assert dense < 40
    assert dense < compressed < 4 * dense
