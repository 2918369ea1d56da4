"""`lorap bench`: the models it times have the plan's shapes (or a checkpoint's real weights), the
report's numbers are consistent, and bad input is refused. Speed itself is measured by benchmark
scripts, never asserted here."""
import json
import statistics

import pytest
import torch

from conftest import build_tiny_model, tiny_config
from lorap import api
from lorap.bench import timing
from lorap.bench.models import first_layers, random_model
from lorap.cli import main
from lorap.methods.presets import config_for
from lorap.plan.counting import count_parameters
from lorap.plan.plan import make_plan

QUICK = ["--prefill", "16", "--batch", "1,2", "--prompt", "8", "--new-tokens", "4", "--repeats", "2", "--warmup", "0"]


@pytest.fixture
def config_file(tmp_path):
    tiny_config("llama_gqa", num_hidden_layers=3).save_pretrained(tmp_path)
    return tmp_path / "config.json"


def test_models_built_from_shapes_have_the_plans_parameters(tiny_arch):
    config = tiny_config(tiny_arch)
    plan = make_plan(config, config_for("paper", ratio=0.4).plan_settings())
    dense = random_model(config, torch.float32, torch.device("cpu"))
    compressed = random_model(config, torch.float32, torch.device("cpu"), layout=plan.layout())
    assert count_parameters(dense) == plan.dense_parameters
    assert count_parameters(compressed) == plan.compressed_parameters
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        assert compressed(ids).logits.shape == dense(ids).logits.shape


def test_bench_from_a_config_reports_interleaved_medians_and_speedups(config_file, tmp_path, capsys, monkeypatch):
    calls = []  # (which model, tokens it was given), in the order the models ran
    built = iter(["dense", "compressed"])  # bench builds the dense model first

    def recorded_model(*args, **kwargs):
        model, label = random_model(*args, **kwargs), next(built)
        model.register_forward_pre_hook(lambda module, a, kw: calls.append((label, kw["input_ids"].shape[-1])),
                                        with_kwargs=True)
        return model

    monkeypatch.setattr("lorap.bench.run.random_model", recorded_model)
    out = tmp_path / "bench.json"
    assert main(["bench", str(config_file), "--ratio", "0.4", "--layers", "2", *QUICK, "--json", str(out),
                 "--markdown", str(tmp_path / "bench.md")]) == 0
    report = json.loads(out.read_text())
    config = tiny_config("llama_gqa", num_hidden_layers=3)
    plan = make_plan(config, config_for("paper", ratio=0.4).plan_settings())
    per_layer_dense = (plan.dense_parameters - plan.other_parameters) // 3
    per_layer_kept = (plan.compressed_parameters - plan.other_parameters) // 3
    other = plan.other_parameters - 2 * config.hidden_size  # one layer (and its two norms) fewer
    assert report["layers_timed"] == 2 and report["weights"].startswith("random")
    assert report["parameters"] == {"dense": other + 2 * per_layer_dense, "compressed": other + 2 * per_layer_kept}
    assert set(report["prefill"]) == {"1x16", "2x16"}
    # Speedups are paired: the median over rounds of dense / compressed, each round's two times
    # measured back to back (decode: each token's two steps, generated in lockstep).
    for row in report["prefill"].values():
        assert row["dense"]["repeats"] == row["compressed"]["repeats"] == 2
        rounds = row["dense"]["rounds_ms"], row["compressed"]["rounds_ms"]
        assert len(rounds[0]) == len(rounds[1]) == 2
        assert row["speedup"] == pytest.approx(statistics.median(d / c for d, c in zip(*rounds)))
        assert row["dense"]["median_ms"] == pytest.approx(statistics.median(rounds[0]))
    decode = report["decode"]
    steps = decode["dense"]["steps_ms"], decode["compressed"]["steps_ms"]
    assert len(steps[0]) == len(steps[1]) == 2 * 4  # repeats x new tokens
    assert decode["speedup"] == pytest.approx(statistics.median(d / c for d, c in zip(*steps)))
    assert decode["dense"]["median_tokens_per_s"] == pytest.approx(
        statistics.median(4 / (sum(steps[0][i:i + 4]) / 1000) for i in (0, 4)))
    assert report["load_average"]["before"] is not None
    # Interleaved: the two models ran in turn, the order reversed every round. Prefill (no warm-up):
    # two rounds per batch size; decode: per repeat both prompts, then 4 tokens each in lockstep.
    prefill_rounds = ["dense", "compressed", "compressed", "dense"]
    decode_run = ["dense", "compressed"] + ["dense", "compressed", "compressed", "dense"] * 2
    assert [label for label, _ in calls] == prefill_rounds * 2 + decode_run * 2
    assert [tokens for _, tokens in calls] == [16] * 8 + ([8, 8] + [1] * 8) * 2
    # The decoder layers' share, timed by hooks in the same runs, and the whole model extrapolated from it.
    assert report["layers_in_model"] == 3
    for row in [*report["prefill"].values(), decode]:
        inside, whole = row["layers_ms"], row["whole_model_ms_extrapolated"]
        assert 0 < inside["dense"] and 0 < inside["compressed"]
        for key in ("speedup", "layers_speedup"):
            low, high = row[f"{key}_quartiles"]
            assert low <= row[key] <= high
        assert 0 < row["whole_model_speedup_extrapolated"]
        for label in ("dense", "compressed"):  # one more layer's time than was timed, in every round
            total = row[label]["median_ms"] if "median_ms" in row[label] else statistics.median(row[label]["steps_ms"])
            assert whole[label] > total
    printed = capsys.readouterr().out
    assert "weights are random" in printed and f"{report['parameters']['compressed']:,}" in printed
    assert "| 2x16 |" in (tmp_path / "bench.md").read_text()


def test_bench_of_a_checkpoint_times_its_real_weights_against_its_base(tmp_path, tiny_tokenizer):
    folder = tmp_path / "dense"
    build_tiny_model("qwen2", vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    result = api.compress(str(folder), tmp_path / "out", ratio=0.4, progress=False, calibration_samples=8,
                          calibration_seqlen=32)
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "out"), *QUICK, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    totals = result.report["plan"]["totals"]
    assert report["weights"] == "real"
    assert report["parameters"] == {"dense": totals["dense_parameters"], "compressed": totals["compressed_parameters"]}


def test_interleaving_alternates_the_order_of_the_models():
    calls = []
    timing.interleaved({"a": "A", "b": "B"}, lambda model: calls.append(model) or 0.0, warmup=1, repeats=3)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]


def test_lockstep_decode_alternates_tokens_and_generates_what_each_model_alone_would():
    config = tiny_config("llama_gqa", num_hidden_layers=2)
    models = {"a": random_model(config, torch.float32, torch.device("cpu"), seed=1),
              "b": random_model(config, torch.float32, torch.device("cpu"), seed=2)}
    seen = []  # (model, the token ids it was given), in call order
    for label, model in models.items():
        model.register_forward_pre_hook(lambda module, args, kwargs, label=label:
                                        seen.append((label, kwargs["input_ids"].tolist())), with_kwargs=True)
    prompt = timing.prompt_ids(config.vocab_size, 6, torch.device("cpu"))
    steps = timing.lockstep_decode(models, prompt, 4)
    assert [len(seconds) for seconds in steps.values()] == [4, 4]
    in_lockstep, seen[:] = list(seen), []
    assert [label for label, _ in in_lockstep[2:]] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after the prompts
    for model in models.values():  # each model on its own is fed the same tokens
        generation = timing.Generation(model, prompt)
        for _ in range(4):
            generation.step()
    alone = sorted(seen, key=lambda call: call[0])
    assert sorted(in_lockstep, key=lambda call: call[0]) == alone


def test_compiled_decode_generates_what_eager_decode_does():
    """Decode as engines run it: a static KV cache and the forward compiled (timing.CompiledGeneration), on
    narrowed heads whose value and query/key sizes differ, so their values need a width of their own."""
    from transformers import StaticCache

    config = tiny_config("llama_gqa", num_hidden_layers=2)
    plan = make_plan(config, config_for("best", ratio=0.3, attention="headdim", allocation_a=3.0).plan_settings())
    assert any(layer.qk_head_dim != layer.v_head_dim for layer in plan.layers)
    model = random_model(config, torch.float32, torch.device("cpu"), layout=plan.layout(), fuse=True)
    prompt = timing.prompt_ids(config.vocab_size, 6, torch.device("cpu"))
    eager = timing.Generation(model, prompt)
    compiled = timing.CompiledGeneration(model, prompt, StaticCache(config=model.config, max_cache_len=12),
                                         timing.compiled_forward(model))
    for _ in range(4):  # the compiled generation took its first step untimed
        eager.step()
        assert torch.equal(compiled.token, eager.token)
        assert compiled.step() > 0


def test_bench_times_compiled_decode_on_request(config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(timing, "compiled_forward", lambda model: model.forward)  # the compiling is tested above
    out = tmp_path / "bench.json"
    assert main(["bench", str(config_file), "--ratio", "0.4", *QUICK, "--compiled-decode", "--json", str(out),
                 "--markdown", str(tmp_path / "bench.md")]) == 0
    compiled = json.loads(out.read_text())["decode_compiled"]
    steps = compiled["dense"]["steps_ms"], compiled["compressed"]["steps_ms"]
    assert len(steps[0]) == len(steps[1]) == 2 * 4  # repeats x new tokens, in lockstep
    assert compiled["speedup"] == pytest.approx(statistics.median(d / c for d, c in zip(*steps)))
    assert "decode tokens/s, compiled (static KV cache, torch.compile)" in capsys.readouterr().out
    assert "| decode tokens/s, compiled (static KV cache, torch.compile) |" in (tmp_path / "bench.md").read_text()


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # Each round's own ratio (1, 3, 2), not the ratio of the two medians (2 / 2).
    ratio = timing.paired_ratio([2.0, 6.0, 2.0], [2.0, 2.0, 1.0])
    assert ratio["median"] == pytest.approx(2.0) and ratio["pairs"] == 3
    assert ratio["low_quartile"] <= ratio["median"] <= ratio["high_quartile"]
    with pytest.raises(ValueError, match="equally long"):
        timing.paired_ratio([1.0], [1.0, 2.0])


@pytest.mark.parametrize("arguments,message", [
    (["--ratio", "0.2", "--layers", "4"], "more than the model's 3 decoder layers"),
    (["--ratio", "0.2", "--layers", "0"], "positive number of decoder layers"),
    (["--layers", "1"], "give --ratio"),
    (["--ratio", "0.2", "--dtype", "int8"], "--dtype must be one of"),
    (["--ratio", "0.2", "--batch", "0"], "batch sizes must be positive"),
])
def test_bad_input_is_one_clear_message(config_file, capsys, arguments, message):
    assert main(["bench", str(config_file), *arguments, *QUICK[:2]]) == 2
    assert message in capsys.readouterr().err


def test_an_unsupported_architecture_and_a_missing_gpu_are_refused(tmp_path, config_file, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert main(["bench", str(tmp_path / "gpt2" / "config.json"), "--ratio", "0.2"]) == 2
    assert "not supported" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", str(config_file), "--ratio", "0.2", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_first_layers_keeps_the_rest_of_the_config():
    config = tiny_config("llama_gqa", num_hidden_layers=3)
    cut = first_layers(config, 1)
    assert cut.num_hidden_layers == 1 and config.num_hidden_layers == 3 and cut.hidden_size == config.hidden_size


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
def test_random_models_are_built_on_the_gpu_with_the_plans_shapes():
    config = tiny_config("llama_gqa", num_hidden_layers=3)
    plan = make_plan(config, config_for("paper", ratio=0.4).plan_settings())
    compressed = random_model(config, torch.bfloat16, torch.device("cuda"), layout=plan.layout(), fuse=True)
    assert {p.device.type for p in compressed.parameters()} == {"cuda"}
    assert {p.dtype for p in compressed.parameters()} == {torch.bfloat16}
    assert count_parameters(compressed) == plan.compressed_parameters


@needs_gpu
def test_layer_clock_on_the_gpu_reads_events_inside_the_forward():
    config = tiny_config("llama_gqa", num_hidden_layers=3)
    model = random_model(config, torch.float32, torch.device("cuda"))
    device = torch.device("cuda")
    clock = timing.LayerClock(model.model.layers, device)
    ids = timing.prompt_ids(config.vocab_size, 64, device)
    whole = [timing.prefill_seconds(model, ids) for _ in range(3)]
    inside = clock.seconds(64)
    clock.remove()
    assert len(inside) == 3 and all(len(times) == 3 for times in clock.per_layer)
    assert all(0 < layers < total for layers, total in zip(inside, whole))


@needs_gpu
def test_bench_on_the_gpu_times_with_cuda_events(config_file, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", str(config_file), "--ratio", "0.4", "--device", "cuda", "--dtype", "bfloat16", *QUICK,
                 "--compiled-decode", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["protocol"]["timer"] == "CUDA events" and report["device"]["type"] == "cuda"
    for row in [*report["prefill"].values(), report["decode"]]:
        assert row["speedup"] > 0 and all(ms > 0 for ms in row["layers_ms"].values())
    assert report["decode_compiled"]["speedup"] > 0  # CUDA graphs replayed
