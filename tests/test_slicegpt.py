"""SliceGPT (methods/slicegpt.py) and its runtime (modeling_sliced.py) on tiny models."""
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny_model

from lorap import modeling_sliced
from lorap.errors import LorapError
from lorap.methods.slicegpt import (
    choose_kept_dim,
    dense_parameters,
    load_sliced_checkpoint,
    removed_share,
    save_sliced_checkpoint,
    slice_model,
    sliced_parameters,
)
from lorap.plan.counting import count_parameters

FAMILIES = ("llama_mha", "llama_gqa", "mistral", "qwen2")
HIDDEN = 64  # conftest's tiny hidden size


def calibration(seed=0, batches=2, rows=4, tokens=24):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (rows, tokens), generator=generator) for _ in range(batches)]


def inputs():
    return torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied_head", ["untie", "keep"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_zero_slicing_is_the_dense_model(arch, tied_head):
    """The paper's defining check: with d' = d, norm fusion and the rotations change nothing."""
    model = build_tiny_model(arch)
    tokens = inputs()
    with torch.no_grad():
        dense = model(tokens).logits
    result = slice_model(model, calibration(), kept_dim=HIDDEN, tied_head=tied_head)
    assert type(model).__name__.startswith("Sliced")
    assert all(type(layer).__name__.startswith("Sliced") for layer in model.model.layers)
    with torch.no_grad():
        rotated = model(tokens).logits
    assert (rotated - dense).abs().max() <= 1e-5
    assert result["kept_variance"][0]["embedding"] == pytest.approx(1.0)


def test_zero_slicing_with_the_head_sliced_too():
    model = build_tiny_model("llama_gqa")
    tokens = inputs()
    with torch.no_grad():
        dense = model(tokens).logits
    slice_model(model, calibration(), kept_dim=HIDDEN, slice_head=True)
    with torch.no_grad():
        assert (model(tokens).logits - dense).abs().max() <= 1e-5


def test_zero_slicing_when_the_mlp_is_run_again(monkeypatch):
    """Where the FFN's activations would take too much memory, the propagation runs the MLP again."""
    from lorap.methods import slicegpt

    monkeypatch.setattr(slicegpt, "KEEP_GATED_BYTES", 0)
    model = build_tiny_model("qwen2")
    tokens = inputs()
    with torch.no_grad():
        dense = model(tokens).logits
    slice_model(model, calibration(), kept_dim=HIDDEN)
    with torch.no_grad():
        assert (model(tokens).logits - dense).abs().max() <= 1e-5


def test_half_precision_is_kept(tmp_path):
    model = build_tiny_model("llama_gqa").to(torch.bfloat16)
    slice_model(model, calibration(), kept_dim=40)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_sliced_checkpoint(model, None, tmp_path / "half")
    reloaded = load_sliced_checkpoint(tmp_path / "half")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    saved = model.state_dict()
    assert all(torch.equal(saved[name], tensor) for name, tensor in reloaded.state_dict().items())


@pytest.mark.parametrize("slice_head", [False, True])
@pytest.mark.parametrize("tied_head", ["untie", "keep"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_parameters_are_the_counted_figure(arch, tied_head, slice_head):
    model = build_tiny_model(arch)
    assert count_parameters(model) == dense_parameters(model.config)
    # counted from the dense config alone, before any weight is touched
    counted = sliced_parameters(model.config, 40, tied_head, slice_head)
    share = removed_share(model.config, 40, tied_head, slice_head)
    result = slice_model(model, calibration(), kept_dim=40, tied_head=tied_head, slice_head=slice_head)
    assert count_parameters(model) == counted == result["sliced_parameters"]
    assert result["removed_share"] == pytest.approx(share)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.in_features == 40 and layer.mlp.down_proj.out_features == 40
    assert tuple(layer.attn_shortcut.weight.shape) == (40, 40)
    assert model.model.embed_tokens.weight.shape[1] == 40
    assert not list(layer.input_layernorm.parameters())  # weightless norms
    tied = tied_head == "keep"  # the tiny models tie their embedding and head
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.config.tie_word_embeddings == tied


def test_slicing_keeps_most_of_the_function():
    """Half the stream, calibrated on the text it is then run on: the logits stay close to the
    dense ones (a random rotation of the same width would not)."""
    model = build_tiny_model("llama_gqa")
    tokens = calibration(seed=3, batches=1, rows=2, tokens=16)[0]
    with torch.no_grad():
        dense = model(tokens).logits
    slice_model(model, calibration(batches=4) + [tokens], kept_dim=48)
    with torch.no_grad():
        sliced = model(tokens).logits
    assert (sliced - dense).norm() / dense.norm() < 0.5


def test_ratio_picks_a_width_near_the_share_asked():
    from transformers import LlamaConfig

    # SmolLM2-135M's shapes (the built-in model), no weights
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    assert dense_parameters(config) == 134_515_008
    for ratio in (0.2, 0.5):
        for tied_head in ("untie", "keep"):
            kept = choose_kept_dim(config, ratio, tied_head)
            assert abs(removed_share(config, kept, tied_head) - ratio) <= 0.005
            # a multiple of 8 wherever one is within half a point (at 50% "keep" none is: 267)
            near = [k for k in (kept - kept % 8, kept - kept % 8 + 8) if abs(removed_share(config, k, tied_head) - ratio) <= 0.005]
            assert kept % 8 == 0 or not near
    assert choose_kept_dim(config, 0.2, "untie") == 312 and choose_kept_dim(config, 0.5, "keep") == 267
    # untied, the head alone is 21% of the model: at 20% d' falls far below keep's
    assert choose_kept_dim(config, 0.2, "untie") < choose_kept_dim(config, 0.2, "keep")
    # shapes alone agree with the runtime's modules (built on the meta device)
    from lorap.methods.slicegpt import plan_layout

    config.slicegpt = plan_layout(config, 272, "keep")
    with torch.device("meta"):
        model = modeling_sliced.SlicedLlamaForCausalLM(config)
    assert count_parameters(model) == sliced_parameters(config, 272, "keep")


def test_ratio_is_resolved_on_the_model():
    model = build_tiny_model("llama_gqa")
    kept = choose_kept_dim(model.config, 0.3)  # from the dense config (slicing unties its head)
    result = slice_model(model, calibration(), ratio=0.3)
    assert result["kept_dim"] == kept
    assert count_parameters(model) == result["sliced_parameters"]


# ---------------------------------------------------------------- checkpoints

REMOTE_LOAD = """
import sys, torch
sys.modules["lorap"] = None  # lorap must not be importable: the checkpoint stands alone
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__.startswith("Sliced"), type(model)
    tokens, expected, want = (torch.load(f"{folder}.{name}.pt") for name in ("inputs", "expected", "generated"))
    with torch.no_grad():
        diff = (model(tokens).logits - expected).abs().max().item()
    print(f"{folder}: max abs diff {diff:.3e}")
    assert diff <= 1e-5, (folder, diff)
    got = model.generate(tokens[:1, :6], max_new_tokens=want.shape[1] - 6, do_sample=False)
    assert torch.equal(got, want), (folder, got, want)
"""
CHECKPOINTS = [("llama_gqa", "untie"), ("qwen2", "keep"), ("mistral", "untie")]


def write_checkpoint(arch, tied_head, folder, tokenizer):
    """A sliced tiny model saved to `folder`, with its logits and greedy generation beside it."""
    model = build_tiny_model(arch)
    slice_model(model, calibration(), kept_dim=40, tied_head=tied_head)
    tokens = inputs()
    with torch.no_grad():
        expected = model(tokens).logits
    generated = model.generate(tokens[:1, :6], max_new_tokens=10, do_sample=False)
    save_sliced_checkpoint(model, tokenizer, folder)
    for name, tensor in (("inputs", tokens), ("expected", expected), ("generated", generated)):
        torch.save(tensor, f"{folder}.{name}.pt")
    return model, tokens, expected, generated


@pytest.mark.parametrize("arch,tied_head", CHECKPOINTS)
def test_checkpoint_round_trip_and_generation(arch, tied_head, tmp_path, tiny_tokenizer):
    model, tokens, expected, generated = write_checkpoint(arch, tied_head, tmp_path / "sliced", tiny_tokenizer)
    # greedy decoding with the KV cache gives what full forwards give
    with torch.no_grad():
        steps = model(generated[:, :-1], use_cache=False).logits[0, 5:].argmax(-1)
    assert torch.equal(steps, generated[0, 6:])
    written = {p.name for p in (tmp_path / "sliced").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_sliced.py", "tokenizer.json"} <= written

    reloaded = load_sliced_checkpoint(tmp_path / "sliced")
    assert count_parameters(reloaded) == count_parameters(model)
    with torch.no_grad():
        assert (reloaded(tokens).logits - expected).abs().max() <= 1e-5
    assert torch.equal(reloaded.generate(tokens[:1, :6], max_new_tokens=10, do_sample=False), generated)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == (tied_head == "keep")


def test_checkpoints_reload_without_lorap(tmp_path, tiny_tokenizer):
    """In a separate process where lorap cannot be imported, plain transformers (trust_remote_code,
    the checkpoint's own modeling_sliced.py) gives the same logits and greedy generation."""
    folders = []
    for arch, tied_head in CHECKPOINTS:
        folders.append(tmp_path / f"{arch}-{tied_head}")
        write_checkpoint(arch, tied_head, folders[-1], tiny_tokenizer)
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, *map(str, folders)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_modeling_file_imports_only_torch_and_transformers():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(modeling_sliced.__file__).read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert roots <= {"torch", "transformers"}


# ---------------------------------------------------------------- refusals, before any work


@pytest.mark.parametrize("arch,reason", [("phi3", "fused"), ("gemma", "1 \\+ weight")])
def test_unsupported_family_is_refused_before_any_work(arch, reason):
    model = build_tiny_model(arch)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(LorapError, match=reason):
        slice_model(model, calibration(), kept_dim=32)
    assert type(model).__name__ == type(build_tiny_model(arch)).__name__
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kept_dim": 65}, "from 1 to the hidden size"),
        ({"kept_dim": 32, "ratio": 0.3}, "either kept_dim or ratio"),
        ({}, "either kept_dim or ratio"),
        ({"ratio": 1.2}, r"in \[0, 1\)"),
        ({"kept_dim": 32, "tied_head": "share"}, "tied_head"),
    ],
)
def test_bad_settings_are_refused_before_any_work(kwargs, message):
    model = build_tiny_model("llama_gqa")
    with pytest.raises(LorapError, match=message):
        slice_model(model, calibration(), **kwargs)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.in_features == HIDDEN


@pytest.mark.parametrize("batches", [[], [torch.zeros(4)], [torch.full((2, 4), 9999)], [torch.rand(2, 4)]])
def test_bad_calibration_is_refused(batches):
    model = build_tiny_model("llama_gqa")
    with pytest.raises(LorapError, match="calibration"):
        slice_model(model, batches, kept_dim=32)


def test_a_sliced_model_is_not_sliced_again():
    model = build_tiny_model("llama_gqa")
    slice_model(model, calibration(), kept_dim=48)
    with pytest.raises(LorapError, match="already sliced"):
        slice_model(model, calibration(), kept_dim=32)


def test_lorap_compress_slices_saves_and_reloads(tmp_path, tiny_tokenizer):
    """`lorap compress --preset slicegpt`: the checkpoint loads through lorap's loader (eval, compare)
    with the in-memory model's logits; streaming is refused before anything loads."""
    from lorap import api
    from lorap.cli import main
    from lorap.io.models import load_model

    source = tmp_path / "dense"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    assert main(["compress", str(source), "--preset", "slicegpt", "--ratio", "0.2", "--samples", "8",
                 "--sample-len", "32", "--out", str(tmp_path / "s"), "--stream"]) == 2
    assert not (tmp_path / "s").exists()
    result = api.compress(str(source), tmp_path / "s", preset="slicegpt", ratio=0.2, calibration_samples=8,
                          calibration_seqlen=32, progress=False)
    totals = result.report["plan"]["totals"]
    assert abs(totals["removed_fraction"] - 0.2) < 0.05
    reloaded, _, loaded_from = load_model(str(tmp_path / "s"))
    assert loaded_from.kind == "sliced"
    assert sum(p.numel() for p in reloaded.parameters()) == totals["compressed_parameters"]
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12))
    with torch.no_grad():
        assert (reloaded(ids).logits - result.model.cpu()(ids).logits).abs().max() <= 1e-5
