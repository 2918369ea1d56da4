"""The checkpoint's faster runtime (optimize_for_inference): one GEMM for the right factors of q/k/v
(fuse_factor_pairs), and left factors stored column by column on the CPU (column_major_left_factors).
It must compute what the plain model computes, keep parameters and saved tensors as they were,
stand aside for training (gradients, PEFT) and for a model moved after fusing, and work where
lorap is not installed."""
import subprocess
import sys

import pytest
import torch

from conftest import build_tiny_model, tiny_config
from lorap.architectures import Architecture
from lorap.bench.models import random_model
from lorap.methods.presets import config_for
from lorap.modeling_lorap import LowRankLinear, SharedRightFactors, column_major_left_factors, fuse_factor_pairs
from lorap.plan.plan import make_plan


def _compressed_pair(arch):
    """(plain, fused) copies of one random compressed model of `arch` (paper's shapes at 40%)."""
    config = tiny_config(arch)
    layout = make_plan(config, config_for("paper", ratio=0.4).plan_settings()).layout()
    plain = random_model(config, torch.float32, "cpu", layout=layout, seed=1)
    fused = random_model(config, torch.float32, "cpu", layout=layout, seed=1)
    return plain, fused, Architecture(config).record()


def _inputs():
    return torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))


def test_fused_model_computes_the_same_logits(tiny_arch):
    plain, fused, architecture = _compressed_pair(tiny_arch)
    before = {name: value.clone() for name, value in fused.state_dict().items()}
    groups = fuse_factor_pairs(fused, architecture)
    assert groups == tiny_config(tiny_arch).num_hidden_layers  # q, k and v are factor pairs in every layer
    with torch.no_grad():
        expected, got = plain(_inputs()).logits, fused(_inputs()).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    after = fused.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    # The saved tensors do not share storage with each other (safetensors would refuse them).
    pointers = [value.data_ptr() for name, value in after.items() if name.endswith("right.weight")]
    assert len(set(pointers)) == len(pointers)


def test_column_major_left_factors_compute_the_same_and_save_as_before():
    plain, laid, _ = _compressed_pair("llama_gqa")
    before = {name: value.clone() for name, value in laid.state_dict().items()}
    pairs = [m for m in laid.modules() if isinstance(m, LowRankLinear)]
    parameters = [pair.left.weight for pair in pairs]
    assert column_major_left_factors(laid) == len(pairs) > 0
    for pair, parameter in zip(pairs, parameters):
        assert pair.left.weight is parameter  # the same parameter, so optimizers and PEFT still hold it
        assert pair.left.weight.stride() == (1, pair.left.out_features)  # stored column by column
    assert column_major_left_factors(laid) == 0  # already laid out: nothing to do twice
    with torch.no_grad():
        assert torch.allclose(laid(_inputs()).logits, plain(_inputs()).logits, atol=1e-5, rtol=1e-5)
    after = laid.state_dict()
    assert after.keys() == before.keys()
    assert all(value.is_contiguous() and torch.equal(value, before[name]) for name, value in after.items())
    laid(_inputs()).logits.sum().backward()  # training still reaches every left factor
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in parameters)


def _calls_of_shared_gemm(model, inputs) -> int:
    calls = []
    original = SharedRightFactors.right_output

    def counting(self, member, x):
        calls.append(member)
        return original(self, member, x)

    SharedRightFactors.right_output = counting
    try:
        model(inputs)
    finally:
        SharedRightFactors.right_output = original
    return len(calls)


def test_the_fused_path_serves_inference_only():
    plain, fused, architecture = _compressed_pair("llama_gqa")
    fuse_factor_pairs(fused, architecture)
    members = [a for layer in fused.model.layers for a in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                            layer.self_attn.v_proj) if isinstance(a, LowRankLinear)]
    assert len(members) >= 4
    with torch.no_grad():
        assert _calls_of_shared_gemm(fused, _inputs()) == len(members)  # every fused pair took its slice
    # With autograd on, each pair runs its own GEMMs, so gradients reach every parameter.
    assert _calls_of_shared_gemm(fused, _inputs()) == 0
    fused(_inputs()).logits.sum().backward()
    rights = [m.right.weight for m in fused.modules() if isinstance(m, LowRankLinear)]
    assert all(weight.grad is not None and weight.grad.abs().sum() > 0 for weight in rights)
    # Moved after fusing: the parameters no longer live in the fused matrix; the pairs fall back.
    fused.to(torch.float64)
    with torch.no_grad():
        assert _calls_of_shared_gemm(fused, _inputs()) == 0
        assert torch.allclose(fused(_inputs()).logits.float(), plain(_inputs()).logits, atol=1e-4)


def test_peft_adapters_on_fused_factors_are_not_bypassed():
    from peft import LoraConfig, get_peft_model

    _, fused, architecture = _compressed_pair("llama_mha")
    fuse_factor_pairs(fused, architecture)
    with torch.no_grad():
        before = fused(_inputs()).logits
    peft_model = get_peft_model(fused, LoraConfig(r=4, target_modules=["right"], init_lora_weights=False))
    with torch.no_grad():
        assert _calls_of_shared_gemm(peft_model, _inputs()) == 0
        assert not torch.allclose(peft_model(_inputs()).logits, before, atol=1e-4)


FUSE_WITHOUT_LORAP = """
import shutil, sys, torch
sys.modules["lorap"] = None  # the checkpoint's own modeling file does the fusing
from transformers import AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.randint(0, 500, (1, 12))
with torch.no_grad():
    expected = model(inputs).logits
    done = model.optimize_for_inference()
    diff = (model(inputs).logits - expected).abs().max().item()
assert done["fused_groups"] == model.config.num_hidden_layers, done
assert done["column_major_left_factors"] > 0, done
assert diff <= 1e-5, diff
model.save_pretrained(sys.argv[2])  # a fused, column-major model still saves plain tensors
shutil.copyfile(f"{folder}/modeling_lorap.py", f"{sys.argv[2]}/modeling_lorap.py")  # save_pretrained leaves it out
again = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
with torch.no_grad():
    assert (again(inputs).logits - expected).abs().max().item() <= 1e-5
print("ok")
"""


@pytest.mark.parametrize("arch", ["llama_gqa", "phi3"])
def test_a_checkpoint_fuses_and_saves_without_lorap(arch, tmp_path, tiny_tokenizer):
    from lorap import api

    dense = tmp_path / "dense"
    build_tiny_model(arch, vocab_size=len(tiny_tokenizer)).save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    folder = tmp_path / "checkpoint"
    api.compress(str(dense), folder, ratio=0.4, progress=False, calibration_samples=4, calibration_seqlen=32, batch_size=4)
    done = subprocess.run([sys.executable, "-c", FUSE_WITHOUT_LORAP, str(folder), str(tmp_path / "saved")],
                          capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert done.returncode == 0, done.stderr[-2000:]
