"""The predicted speedup of `lorap plan` / `lorap compress` (bench/predict.py): which layer layouts
it times, how it fills in the others, that its numbers add up, and that it steps aside when memory
is short. How fast anything is, is measured by benchmark scripts, never asserted here."""
import json

import pytest

from conftest import tiny_config
from lorap.bench import predict
from lorap.cli import main
from lorap.methods.presets import config_for
from lorap.plan.plan import make_plan


def _plan(arch="llama_gqa", layers=4, **settings):
    config = tiny_config(arch, num_hidden_layers=layers)
    return config, make_plan(config, config_for(settings.pop("preset", "paper"), **settings).plan_settings())


def test_interpolation_is_exact_at_samples_and_linear_between():
    sizes, times = [100, 200, 400], [1.0, 3.0, 5.0]
    assert predict._interpolated(sizes, times, 200) == 3.0
    assert predict._interpolated(sizes, times, 150) == pytest.approx(2.0)
    assert predict._interpolated(sizes, times, 300) == pytest.approx(4.0)
    assert predict._interpolated([100], [2.0], 150) == pytest.approx(3.0)  # one sample: time in proportion


def test_uniform_plans_time_one_layout_and_many_layouts_are_sampled_across_their_range():
    _, uniform = _plan(ratio=0.4)
    layouts, sizes = predict._sampled_layouts(uniform)
    assert len(layouts) == 1 and layouts[0] == uniform.layout()[0]

    config, plan = _plan(layers=12, ratio=0.4)
    widths = list(range(64, 160, 8))  # twelve different FFN widths, as adaptive allocation gives
    varied = plan.with_ffn_widths(widths)
    layouts, sizes = predict._sampled_layouts(varied)
    assert len(layouts) == predict.MAX_SAMPLED_LAYERS
    assert sizes == sorted(sizes)
    assert {layouts[0]["intermediate_size"], layouts[-1]["intermediate_size"]} == {64, 152}


def test_prediction_adds_up(tiny_arch):
    config, plan = _plan(tiny_arch, layers=3, ratio=0.4)
    result = predict.predict_speedup(config, plan, "cpu", prefill_tokens=16, repeats=2, budget_s=0)
    assert result["layers"] == 3 and result["sampled_layouts"] == 1 and result["dtype"] == "float32"
    for label, tokens in (("prefill", 16), ("decode", 1)):
        row = result[label]
        assert row["tokens"] == tokens and row["dense_ms"] > 0 and row["compressed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["compressed_ms"])


def test_prediction_steps_aside_when_memory_is_short(monkeypatch):
    config, plan = _plan(ratio=0.4)
    monkeypatch.setattr(predict, "available_memory_bytes", lambda: 1000)
    assert "skipped" in predict.predict_speedup(config, plan, "cpu")


def test_plan_prints_the_prediction_and_no_speed_skips_it(tmp_path, capsys):
    tiny_config("llama_gqa").save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path / "config.json"), "--ratio", "0.4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted_speed"]["prefill"]["speedup"] > 0
    assert main(["plan", str(tmp_path / "config.json"), "--ratio", "0.4"]) == 0
    assert "predicted speedup on this machine" in capsys.readouterr().out
    assert main(["plan", str(tmp_path / "config.json"), "--ratio", "0.4", "--json", "--no-speed"]) == 0
    assert "predicted_speed" not in json.loads(capsys.readouterr().out)
