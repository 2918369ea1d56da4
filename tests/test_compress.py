"""Compression end to end on tiny models of every architecture: shapes, counts, the sequential
walk, checkpoints that reload (with and without lorap), and the refusals of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from lorap.architectures import Architecture
from lorap import api
from lorap.plan.plan import EXACT_TOLERANCE
from lorap.pipeline.statistics import AllInputsSeen, InputStatistics
from lorap.pipeline.walk import capture_first_layer_inputs, layer_output
from lorap.pipeline.layer_step import LayerCompressor
from lorap.pipeline.run import compress_model
from lorap.pipeline.config import CompressionConfig
from lorap.plan.counting import count_parameters
from lorap.io.data import calibration_samples
from lorap.errors import LorapError
from lorap.modeling_lorap import LowRankLinear

SMALL = dict(calibration_samples=8, calibration_seqlen=32, batch_size=4)


def _tiny(arch, tokenizer, **overrides):
    return build_tiny_model(arch, vocab_size=len(tokenizer), **overrides)


@pytest.mark.parametrize("mode", ["reference", "exact"])
def test_shapes_and_counts_follow_the_plan(tiny_arch, tiny_tokenizer, mode):
    model = _tiny(tiny_arch, tiny_tokenizer)
    dense = count_parameters(model)
    result = compress_model(model, tiny_tokenizer, CompressionConfig(ratio=0.4, mode=mode, **SMALL), progress=False)
    plan = result.plan
    assert count_parameters(model) == plan.compressed_parameters < dense
    if mode == "exact":
        assert abs(1 - plan.compressed_parameters / dense - 0.4) <= EXACT_TOLERANCE
    architecture = Architecture(model.config)
    for layer, layer_plan in zip(model.model.layers, plan.layers):
        for name, rank in layer_plan.ranks.items():
            module = architecture.projection(layer, name)
            if rank is None:
                assert isinstance(module, torch.nn.Linear)
            else:
                assert isinstance(module, LowRankLinear) and module.right.out_features == rank
        gate, down = architecture.projection(layer, "gate_proj"), architecture.projection(layer, "down_proj")
        assert gate.out_features == layer_plan.ffn_width == down.in_features
    with torch.no_grad():
        logits = model(torch.randint(0, len(tiny_tokenizer), (2, 16))).logits
    assert torch.isfinite(logits).all()


def test_qwen2_bias_stays_on_the_outer_factor(tiny_tokenizer):
    model = _tiny("qwen2", tiny_tokenizer)
    biases = [layer.self_attn.q_proj.bias.clone() for layer in model.model.layers]
    compress_model(model, tiny_tokenizer, CompressionConfig(ratio=0.5, **SMALL), progress=False)
    for layer, bias in zip(model.model.layers, biases):
        q = layer.self_attn.q_proj
        assert isinstance(q, LowRankLinear) and q.right.bias is None
        assert torch.equal(q.left.bias, bias)


def test_each_layer_is_calibrated_on_the_compressed_outputs_before_it(tiny_tokenizer):
    config = CompressionConfig(ratio=0.5, **SMALL)
    samples = calibration_samples(tiny_tokenizer, "wiki", 8, 32, 0)
    dense = _tiny("llama_gqa", tiny_tokenizer)

    def second_layer_q_input_squares(model):
        stats = InputStatistics(Architecture(model.config).input_modules(model.model.layers[1]))
        with stats.recording(), torch.no_grad():
            model(samples, use_cache=False)
        return stats.sum_squares["q_proj"]

    dense_squares = second_layer_q_input_squares(dense)
    seen = {}
    model = _tiny("llama_gqa", tiny_tokenizer)
    result = compress_model(model, tiny_tokenizer, config, progress=False)
    inner = LayerCompressor(config, result.plan, Architecture(model.config))

    # Re-run the walk on a fresh copy, recording what layer 1 was calibrated on.
    def recording(index, layer, stats):
        seen[index] = stats.sum_squares["q_proj"].clone()
        inner(index, layer, stats)

    from lorap.pipeline.walk import walk_layers

    fresh = _tiny("llama_gqa", tiny_tokenizer)
    walk_layers(fresh, capture_first_layer_inputs(fresh, samples, 4, "cpu"), "cpu", recording, progress=False)
    compressed_squares = second_layer_q_input_squares(fresh)
    assert torch.allclose(seen[1], compressed_squares, rtol=1e-4)
    assert not torch.allclose(seen[1], dense_squares, rtol=1e-2)


def test_a_pass_that_only_records_inputs_stops_before_the_last_projection(tiny_arch, tiny_tokenizer):
    """The compressing walk's statistics pass skips the last projection (its output is discarded) and
    records exactly what a whole pass records, batch after batch."""
    model = _tiny(tiny_arch, tiny_tokenizer)
    samples = calibration_samples(tiny_tokenizer, "wiki", 8, 32, 0)
    batches = capture_first_layer_inputs(model, samples, 4, "cpu")
    architecture = Architecture(model.config)
    layer = architecture.decoder_layers(model)[1]
    modules = architecture.input_modules(layer)
    last = modules["down_proj"]
    calls = []
    handle = last.register_forward_hook(lambda *_: calls.append(1))

    def record(stop: bool) -> InputStatistics:
        stats = InputStatistics(modules, gram_sources=tuple(modules))
        stopped = 0
        with stats.recording(stop_when_all_seen=stop), torch.no_grad():
            for batch in batches:
                try:
                    layer_output(layer, batch)
                except AllInputsSeen:
                    stopped += 1
        assert stopped == (len(batches) if stop else 0)
        return stats

    whole = record(stop=False)
    assert len(calls) == len(batches) == 2
    calls.clear()
    stopped = record(stop=True)
    handle.remove()
    assert not calls  # the down projection never ran
    assert stopped.sequences == whole.sequences and stopped.tokens == whole.tokens
    for table in ("sum_squares", "sums", "sum_abs", "grams"):
        recorded, expected = getattr(stopped, table), getattr(whole, table)
        assert recorded.keys() == expected.keys() == modules.keys()
        for name in expected:
            assert torch.equal(recorded[name], expected[name]), (table, name)


def test_nan_activations_name_the_layer(tiny_tokenizer):
    model = _tiny("llama_gqa", tiny_tokenizer)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(LorapError, match="layer 1"):
        compress_model(model, tiny_tokenizer, CompressionConfig(ratio=0.3, **SMALL), progress=False)


def test_unsupported_architecture_lists_the_supported_ones(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer)))
    with pytest.raises(LorapError, match="gemma, llama, mistral, phi3, qwen2"):
        compress_model(model, tiny_tokenizer, CompressionConfig(ratio=0.3, **SMALL), progress=False)


# ---------------------------------------------------------------- checkpoints

# One process per test session, where lorap cannot be imported, reloads each checkpoint it is given with
# plain transformers: starting Python with torch and transformers costs seconds, once instead of per check.
# Every checkpoint carries the same modeling file, so the module transformers caches for one serves all.
LORAP_FREE_WORKER = """
import json, sys, traceback
sys.modules["lorap"] = None  # lorap must not be importable: the checkpoint stands alone
import torch
from transformers import AutoModelForCausalLM
for line in sys.stdin:
    job = json.loads(line)
    try:
        model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True)
        assert type(model).__name__.startswith("Lorap"), type(model)
        with torch.no_grad():
            logits = model(torch.load(job["inputs"])).logits
        diff = (logits - torch.load(job["expected"])).abs().max().item()
        assert diff <= 1e-5, f"max abs diff {diff:.3e}"
        answer = {"ok": True}
    except Exception as error:  # its kind and message first: a long message would hide them in the tail
        answer = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1000] + chr(10) + traceback.format_exc()[-1000:]}
    print("RESULT " + json.dumps(answer), flush=True)
"""
_worker = None


def _lorap_free_worker():
    """The session's worker process (started on first use, restarted if it died), its stderr to a file."""
    global _worker
    if _worker is None or _worker.poll() is not None:
        import atexit
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="lorap-free-"))
        _worker = subprocess.Popen(
            [sys.executable, "-c", LORAP_FREE_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(scratch / "stderr.txt").open("w"), text=True,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(scratch / "modules")},
        )
        _worker.scratch = scratch
        atexit.register(_worker.kill)
    return _worker


def assert_reloads_without_lorap(folder, inputs, expected, tmp_path):
    """In a separate process where lorap cannot be imported, plain transformers reloads `folder`
    (trust_remote_code) and gives `expected` logits for `inputs` within 1e-5."""
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(expected, tmp_path / "expected.pt")
    worker = _lorap_free_worker()
    job = {"folder": str(folder), "inputs": str(tmp_path / "inputs.pt"), "expected": str(tmp_path / "expected.pt")}
    worker.stdin.write(json.dumps(job) + "\n")
    worker.stdin.flush()
    for line in worker.stdout:
        if line.startswith("RESULT "):
            answer = json.loads(line[len("RESULT "):])
            assert answer["ok"], answer["error"]
            return
    raise AssertionError("the lorap-free process ended: " + (worker.scratch / "stderr.txt").read_text()[-2000:])


def test_checkpoint_round_trip(tiny_model_dir, tmp_path, tiny_arch):
    out = tmp_path / "compressed"
    result = api.compress(str(tiny_model_dir), out, ratio=0.4, progress=False, **SMALL)
    written = {p.name for p in out.iterdir()}
    assert {"compression_report.json", "config.json", "model.safetensors", "modeling_lorap.py", "tokenizer.json"} <= written
    assert not list(tmp_path.glob(".compressed.*"))  # no staging folders left behind
    config = json.loads((out / "config.json").read_text())
    assert [layer["intermediate_size"] for layer in config["lorap"]["layers"]] == [
        row["width"] for row in result.report["plan"]["modules"] if row["module"] == "gate_proj"
    ]
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_lorap.Lorap")
    assert config["lorap"]["base_model"] == str(tiny_model_dir.resolve())
    assert config["lorap"]["calibration"]["samples"] == 8

    inputs = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        expected = result.model(inputs).logits
    reloaded, _ = api.load(out)
    assert count_parameters(reloaded) == result.report["plan"]["totals"]["compressed_parameters"]
    with torch.no_grad():
        assert (reloaded(inputs).logits - expected).abs().max() <= 1e-5

    assert_reloads_without_lorap(out, inputs, expected, tmp_path)
    if tiny_arch == "llama_gqa":  # the check can fail: other logits, or a folder that is no checkpoint
        with pytest.raises(AssertionError, match="max abs diff"):
            assert_reloads_without_lorap(out, inputs, expected + 1e-3, tmp_path)
        with pytest.raises(AssertionError, match="^(OSError|ValueError): "):
            assert_reloads_without_lorap(tmp_path, inputs, expected, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_kept(tmp_path, tiny_tokenizer, dtype):
    folder = tmp_path / "half"
    _tiny("llama_gqa", tiny_tokenizer).to(dtype).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    api.compress(str(folder), out, ratio=0.3, progress=False, **SMALL)
    reloaded, _ = api.load(out)
    assert {p.dtype for p in reloaded.parameters()} == {dtype}


def test_existing_output_is_refused_then_replaced_with_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(LorapError, match="not empty"):
        api.compress(str(tiny_model_dir), out, ratio=0.3, progress=False, **SMALL)
    assert (out / "keep.txt").read_text() == "precious"
    api.compress(str(tiny_model_dir), out, ratio=0.3, overwrite=True, progress=False, **SMALL)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_output_inside_the_input_model_is_refused(tiny_model_dir):
    with pytest.raises(LorapError, match="overlaps the input model"):
        api.compress(str(tiny_model_dir), tiny_model_dir / "sub", ratio=0.3, progress=False, **SMALL)


def test_failed_save_leaves_nothing_and_input_untouched(tiny_model_dir, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    out = tmp_path / "out"

    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the weights were written

    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.save_pretrained", broken_save)
    with pytest.raises(KeyboardInterrupt):
        api.compress(str(tiny_model_dir), out, ratio=0.3, progress=False, **SMALL)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before
