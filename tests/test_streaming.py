"""Streamed compression (one layer at a time from safetensors shards): equal to the in-memory run,
resumable bit for bit, and refusing what it cannot do. Peak memory is measured by benchmarks/scaling.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model
from lorap import api
from lorap.errors import LorapError
from lorap.methods.presets import METHODS, config_for

SMALL = dict(ratio=0.4, calibration_samples=8, calibration_seqlen=32, batch_size=4)


def _weights(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture
def sharded_model_dir(tmp_path, tiny_tokenizer, request):
    """A 4-layer tiny model saved in several small shards (the way big checkpoints come)."""
    arch, tied = getattr(request, "param", ("llama_gqa", False))
    folder = tmp_path / f"sharded-{arch}"
    model = build_tiny_model(arch, num_hidden_layers=4, vocab_size=len(tiny_tokenizer), tie_word_embeddings=tied)
    model.save_pretrained(folder, max_shard_size="50KB")
    tiny_tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 4
    return folder


def _assert_same_checkpoints(mem_folder, str_folder, atol=1e-5):
    config_mem = json.loads((mem_folder / "config.json").read_text())
    config_str = json.loads((str_folder / "config.json").read_text())
    assert config_str == config_mem  # same lorap layout, metadata, auto_map and architectures
    mem, stream = _weights(mem_folder), _weights(str_folder)
    assert mem.keys() == stream.keys()
    for name in mem:
        assert mem[name].shape == stream[name].shape, name
        assert torch.allclose(mem[name], stream[name], atol=atol, rtol=0), name
    model_mem, tokenizer = api.load(mem_folder)
    model_str, _ = api.load(str_folder)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.allclose(model_mem(ids).logits, model_str(ids).logits, atol=atol)


@pytest.mark.parametrize("sharded_model_dir", [("llama_gqa", False), ("qwen2", True), ("phi3", False), ("gemma", True)],
                         indirect=True, ids=str)
def test_streamed_equals_in_memory(sharded_model_dir, tmp_path):
    in_memory = api.compress(str(sharded_model_dir), tmp_path / "mem", progress=False, **SMALL)
    streamed = api.compress(str(sharded_model_dir), tmp_path / "str", progress=False, stream=True, **SMALL)
    assert streamed.model is None
    assert streamed.report["plan"] == in_memory.report["plan"]
    _assert_same_checkpoints(tmp_path / "mem", tmp_path / "str")
    assert streamed.report["streaming"]["activations"] == {
        "dtype": "float32",
        "model_dtype": "float32",
        "store": "memory",
        "bytes": 8 * 32 * 64 * 4,
    }
    assert not list(tmp_path.glob(".str*"))  # the staging folder was renamed into place


# Every preset streams; those with whole-model decisions (adaptive widths, Taylor scores) make them
# in a streamed scoring pass first. On every family for those with a whole-model pass (Phi-3's fused
# attention takes no per-layer head counts: it streams the Taylor criterion with low-rank attention).
PRESET_CASES = [("llama_gqa", False, name) for name in METHODS if name != "slicegpt"] + [  # it refuses to stream
    (arch, tied, name) for arch, tied in (("qwen2", True), ("gemma", True))
    for name in ("best", "flap", "llm-pruner-taylor")
] + [("phi3", False, name) for name in ("best", "llm-pruner-taylor-ffn", "svd-llm")] + [
    ("qwen2", True, "shortgpt")]  # (Phi-3's fused gate_up as factor pairs; Qwen2's per-layer layer_types)


@pytest.mark.parametrize("sharded_model_dir,preset", [((arch, tied), name) for arch, tied, name in PRESET_CASES],
                         indirect=["sharded_model_dir"], ids=[f"{a}-{n}" for a, _, n in PRESET_CASES])
def test_every_preset_streams_equal_to_in_memory(sharded_model_dir, preset, tmp_path):
    settings = {**SMALL, "preset": preset}
    if preset == "serving":  # its 256-wide FFN blocks need a wider FFN than the tiny model's
        settings["align"] = 8
    in_memory = api.compress(str(sharded_model_dir), tmp_path / "mem", progress=False, **settings)
    streamed = api.compress(str(sharded_model_dir), tmp_path / "str", progress=False, stream=True, **settings)
    assert streamed.report["plan"] == in_memory.report["plan"]
    _assert_same_checkpoints(tmp_path / "mem", tmp_path / "str")
    phases = streamed.report["peak_rss_mb_by_phase"]
    # (one phase may serve two parts: Taylor's gradients for heads and FFN channels)
    passes = list(dict.fromkeys(spec.prepare_phase for spec in config_for(preset).specs().values() if spec.needs_whole_model))
    assert list(phases) == ["before_passes", *passes, "layer_walk"]
    assert all(streamed.report["timings"][phase] > 0 for phase in passes)
    assert not (tmp_path / "str" / "taylor").exists()


@pytest.mark.parametrize("sharded_model_dir", [("qwen2", True), ("phi3", False)], indirect=True, ids=str)
def test_narrowed_heads_stream_equal_to_in_memory(sharded_model_dir, tmp_path):
    settings = {**SMALL, "preset": "best", "attention": "headdim", "align": 1}
    in_memory = api.compress(str(sharded_model_dir), tmp_path / "mem", progress=False, **settings)
    streamed = api.compress(str(sharded_model_dir), tmp_path / "str", progress=False, stream=True, **settings)
    assert streamed.report["plan"] == in_memory.report["plan"]
    _assert_same_checkpoints(tmp_path / "mem", tmp_path / "str")


# Resuming must restore what earlier layers chose from data: with narrowed heads, the kept RoPE dims
# (saved with each layer's weights). Uniform widths: no scoring pass, so the layers walked are the compressing walk's.
@pytest.mark.parametrize("settings", [{}, {"preset": "best", "attention": "headdim", "align": 1, "ffn_allocation": "uniform"}],
                         ids=["paper", "headdim"])
def test_interrupted_run_resumes_to_the_same_bytes(sharded_model_dir, tmp_path, monkeypatch, settings):
    import lorap.pipeline.sharded

    SMALL = {**globals()["SMALL"], **settings}
    api.compress(str(sharded_model_dir), tmp_path / "whole", progress=False, stream=True, **SMALL)

    real_step = lorap.pipeline.sharded.process_layer
    visited = []

    def interrupted_after_layer_1(index, *args):
        if index == 2:
            raise KeyboardInterrupt  # as if Ctrl-C (or an out-of-memory kill) hit layer 2
        visited.append(index)
        real_step(index, *args)

    monkeypatch.setattr(lorap.pipeline.sharded, "process_layer", interrupted_after_layer_1)
    with pytest.raises(KeyboardInterrupt):
        api.compress(str(sharded_model_dir), tmp_path / "resumed", progress=False, stream=True, **SMALL)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.streaming").is_dir()

    def counting_step(index, *args):
        visited.append(index)
        real_step(index, *args)

    monkeypatch.setattr(lorap.pipeline.sharded, "process_layer", counting_step)
    with pytest.raises(LorapError, match="--resume"):
        api.compress(str(sharded_model_dir), tmp_path / "resumed", progress=False, stream=True, **SMALL)
    with pytest.raises(LorapError, match="settings"):
        api.compress(str(sharded_model_dir), tmp_path / "resumed", progress=False, resume=True, **{**SMALL, "seed": 1})
    result = api.compress(str(sharded_model_dir), tmp_path / "resumed", progress=False, resume=True, **SMALL)
    assert visited == [0, 1, 2, 3]  # layers 0 and 1 were not redone
    assert result.report["streaming"]["resumed_after_layers"] == 2
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in whole:
        if name != "compression_report.json":  # timings and dates differ
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_float16_activations_on_disk_are_recorded(sharded_model_dir, tmp_path):
    exact = api.compress(str(sharded_model_dir), tmp_path / "exact", progress=False, stream=True, **SMALL)
    result = api.compress(
        str(sharded_model_dir),
        tmp_path / "half",
        progress=False,
        stream=True,
        activation_dtype="float16",
        activation_store="disk",
        **SMALL,
    )
    activations = result.report["streaming"]["activations"]
    assert activations == {"dtype": "float16", "model_dtype": "float32", "store": "disk", "bytes": 8 * 32 * 64 * 2}
    assert result.report["plan"] == exact.report["plan"]
    assert not [p for p in (tmp_path / "half").iterdir() if p.name.startswith("activations")]
    half, full = _weights(tmp_path / "half"), _weights(tmp_path / "exact")
    # Layer 0 sees the same (float32-captured) inputs rounded to float16: close, not equal.
    prefix = "model.layers.0.self_attn.q_proj."
    product = lambda w: w[prefix + "left.weight"] @ w[prefix + "right.weight"]  # noqa: E731
    assert (product(half) - product(full)).norm() < 0.01 * product(full).norm()


def test_cli_stream_and_plan_memory_estimate(sharded_model_dir, tmp_path, capsys):
    from lorap.cli import main

    out = tmp_path / "cli"
    argv = ["compress", str(sharded_model_dir), "--out", str(out), "--ratio", "0.4", "--samples", "8"]
    assert main([*argv, "--sample-len", "32", "--stream"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    report = json.loads((out / "compression_report.json").read_text())
    assert report["streaming"]["layers"] == 4
    assert main(["plan", str(sharded_model_dir), "--ratio", "0.2"]) == 0
    assert "streamed (--stream)" in capsys.readouterr().out


def test_llama_memory_estimates_are_ordered():
    from transformers import LlamaConfig

    from lorap.plan.plan import PlanSettings, make_plan
    from lorap.plan.memory import memory_estimate

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000, torch_dtype="float16"
    )
    estimate = memory_estimate(config, make_plan(config, PlanSettings(0.2)))
    assert estimate["checkpoint_bytes"] == 6_738_415_616 * 2
    assert estimate["activation_bytes"] == 128 * 128 * 4096 * 2
    assert 1.0 * 2**30 < estimate["streaming_peak_bytes"] < 0.2 * estimate["in_memory_peak_bytes"]


def test_streaming_needs_safetensors(tmp_path, tiny_tokenizer):
    folder = tmp_path / "bin"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).save_pretrained(folder, safe_serialization=False)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(LorapError, match="safetensors"):
        api.compress(str(folder), tmp_path / "out", progress=False, stream=True, **SMALL)
    with pytest.raises(LorapError, match="--eval"):
        api.compress(str(folder), tmp_path / "out", progress=False, stream=True, evaluate_ppl=("wiki",), **SMALL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_on_cuda_matches_cpu(sharded_model_dir, tmp_path):
    api.compress(str(sharded_model_dir), tmp_path / "cpu", progress=False, stream=True, device="cpu", **SMALL)
    result = api.compress(str(sharded_model_dir), tmp_path / "gpu", progress=False, stream=True, device="cuda", **SMALL)
    assert result.report["streaming"]["activations"]["store"] == "memory"
    cpu, gpu = _weights(tmp_path / "cpu"), _weights(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert cpu[name].device.type == "cpu" and cpu[name].shape == gpu[name].shape
    # Factors are defined up to sign per singular vector: compare the products.
    prefix = "model.layers.3.self_attn.q_proj."
    product = lambda w: w[prefix + "left.weight"] @ w[prefix + "right.weight"]  # noqa: E731
    assert torch.allclose(product(cpu), product(gpu), atol=1e-3)


def test_missing_or_truncated_shard_is_refused_before_any_work(sharded_model_dir, tmp_path):
    shards = sorted(sharded_model_dir.glob("model-*.safetensors"))
    data = shards[3].read_bytes()
    shards[3].write_bytes(data[: len(data) - 100])  # a download cut short
    with pytest.raises(LorapError, match="truncated"):
        api.compress(str(sharded_model_dir), tmp_path / "out", progress=False, stream=True, **SMALL)
    shards[3].unlink()
    with pytest.raises(LorapError, match="missing"):
        api.compress(str(sharded_model_dir), tmp_path / "out", progress=False, stream=True, **SMALL)
    assert not (tmp_path / "out").exists()


def test_a_disk_without_room_for_the_output_is_refused_before_the_walk(sharded_model_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import lorap.pipeline.sharded

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    walked = []
    monkeypatch.setattr(lorap.pipeline.sharded, "process_layer", lambda *args: walked.append(args))
    with pytest.raises(LorapError, match="GiB free"):
        api.compress(str(sharded_model_dir), tmp_path / "out", progress=False, stream=True, **SMALL)
    assert walked == [] and not list(tmp_path.glob("*out*"))  # no output, no staging folder


def test_resuming_against_a_changed_checkpoint_is_refused(sharded_model_dir, tmp_path, monkeypatch):
    import os

    import lorap.pipeline.sharded

    real_step = lorap.pipeline.sharded.process_layer

    def interrupted_at_layer_2(index, *args):
        if index == 2:
            raise KeyboardInterrupt
        real_step(index, *args)

    monkeypatch.setattr(lorap.pipeline.sharded, "process_layer", interrupted_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        api.compress(str(sharded_model_dir), tmp_path / "out", progress=False, stream=True, **SMALL)
    monkeypatch.setattr(lorap.pipeline.sharded, "process_layer", real_step)
    shard = sorted(sharded_model_dir.glob("model-*.safetensors"))[2]
    os.utime(shard, (shard.stat().st_atime, shard.stat().st_mtime + 60))  # the input was replaced meanwhile
    with pytest.raises(LorapError, match="another checkpoint"):
        api.compress(str(sharded_model_dir), tmp_path / "out", progress=False, resume=True, **SMALL)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.streaming").is_dir()  # kept, for the user to decide
