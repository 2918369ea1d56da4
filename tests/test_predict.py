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


def _layer_weights(layer) -> int:
    """Parameters of a decoder layer the plan counts (its norms are among the untouched ones)."""
    return sum(p.numel() for name, p in layer.named_parameters() if "norm" not in name)


@pytest.mark.parametrize("widths", [None, list(range(64, 160, 8))], ids=["uniform", "twelve_widths"])
def test_prediction_adds_up(tiny_arch, widths, monkeypatch):
    """With a stand-in clock under which every decoder layer takes time in proportion to its
    weights, the predicted totals must be the untouched part's time plus that rate times the plan's
    dense or compressed layer parameters: the layers' sum, and (for layouts not timed) the
    interpolation, are exact then."""
    config, plan = _plan(tiny_arch, layers=3 if widths is None else len(widths), ratio=0.4)
    if widths is not None:
        plan = plan.with_ffn_widths(widths)
    rest_s = {16: 0.005, 1: 0.0007}  # seconds outside the decoder layers, per forward
    per_weight_s = {16: 3e-9, 1: 2e-10}
    timed = []

    def stand_in_clock(model, tokens, device, warmup, repeats, budget_s):
        length = tokens.shape[-1]
        layers = [per_weight_s[length] * _layer_weights(layer) for layer in model.model.layers]
        timed.append([_layer_weights(layer) for layer in model.model.layers])
        return layers, rest_s[length] + sum(layers)

    monkeypatch.setattr(predict, "_timed_forwards", stand_in_clock)
    result = predict.predict_speedup(config, plan, "cpu", prefill_tokens=16, repeats=2, budget_s=0)
    layer_share = {"dense": plan.dense_parameters - plan.other_parameters,
                   "compressed": plan.compressed_parameters - plan.other_parameters}
    assert result["layers"] == len(plan.layers) and result["dtype"] == "float32"
    # one dense layer, then the distinct compressed layouts (at most MAX_SAMPLED_LAYERS of them)
    expected_samples = 1 if widths is None else predict.MAX_SAMPLED_LAYERS
    assert result["sampled_layouts"] == expected_samples and len(timed[0]) == 1 + expected_samples
    assert timed[0][0] * len(plan.layers) == layer_share["dense"]
    for label, tokens in (("prefill", 16), ("decode", 1)):
        row = result[label]
        expected = {kind: 1000 * (rest_s[tokens] + per_weight_s[tokens] * share) for kind, share in layer_share.items()}
        assert row["tokens"] == tokens
        assert row["dense_ms"] == pytest.approx(expected["dense"], rel=1e-9)
        assert row["compressed_ms"] == pytest.approx(expected["compressed"], rel=1e-9)
        assert row["speedup"] == pytest.approx(expected["dense"] / expected["compressed"], rel=1e-9)


def test_prediction_times_the_micro_benchmark_model(tiny_arch):
    """The real clock: every figure measured, and the speedup the ratio of the predicted totals."""
    config, plan = _plan(tiny_arch, layers=3, ratio=0.4)
    result = predict.predict_speedup(config, plan, "cpu", prefill_tokens=16, repeats=2, budget_s=0)
    for label in ("prefill", "decode"):
        row = result[label]
        assert row["dense_ms"] > 0 and row["compressed_ms"] > 0
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
