"""Efficiency: MACs from shapes against torch's flop counter; the timing code runs (no timing asserts)."""
import pytest
import torch

from conftest import build_tiny_model
from lorap.bench import timing
from lorap.evaluate import efficiency


class _TwoFactors(torch.nn.Module):
    """Stands in for a factorized projection: x -> left(right(x)), two thin nn.Linear."""

    def __init__(self, linear: torch.nn.Linear, rank: int):
        super().__init__()
        self.right = torch.nn.Linear(linear.in_features, rank, bias=False)
        self.left = torch.nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        self.out_features = linear.out_features  # as lorap's LowRankLinear says it

    def forward(self, x):
        return self.left(self.right(x))


def _compress_shapes(model, rank=8, keep=96):
    """Factorize every attention projection and drop FFN channels, as a LoRAP model looks."""
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attention, name, _TwoFactors(getattr(attention, name), rank))
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            setattr(mlp, name, torch.nn.Linear(old.in_features, keep, bias=False))
        mlp.down_proj = torch.nn.Linear(keep, mlp.down_proj.out_features, bias=False)
    return model


@pytest.mark.parametrize("seqlen", [16, 100])
def test_macs_from_shapes_equal_the_flop_counter(tiny_model, seqlen):
    shapes = efficiency.macs_per_token(tiny_model, seqlen)
    assert efficiency.counted_macs_per_token(tiny_model, seqlen) == shapes["total"]
    config = tiny_model.config
    # Hand count for the tiny config: 2 layers x (q, k, v, o + FFN) + LM head.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = 64 * q * 2 + 64 * kv * 2 + 3 * 64 * 160
    assert shapes["linear"] == 2 * per_layer + 64 * 512
    assert shapes["attention"] == 2 * 2 * config.num_attention_heads * head_dim * seqlen


def test_macs_follow_compressed_shapes():
    model = build_tiny_model("qwen2")
    dense = efficiency.macs_per_token(model, 32)
    _compress_shapes(model)
    compressed = efficiency.macs_per_token(model, 32)
    assert efficiency.counted_macs_per_token(model, 32) == compressed["total"]
    removed_ffn = 2 * 3 * 64 * (160 - 96)
    attention_dense = 2 * (2 * 64 * 64 + 2 * 64 * 32)
    attention_factored = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))  # rank x (in + out)
    assert dense["linear"] - compressed["linear"] == removed_ffn + attention_dense - attention_factored


def test_fused_attention_is_counted_and_restored():
    model = build_tiny_model("llama_gqa")
    model.config._attn_implementation = "sdpa"
    # The counter cannot see CPU's fused attention; the count switches to eager and back.
    assert efficiency.counted_macs_per_token(model, 8) == efficiency.macs_per_token(model, 8)["total"]
    assert model.config._attn_implementation == "sdpa"


def test_measure_runs_on_a_tiny_model():
    model = build_tiny_model("llama_gqa")
    result = efficiency.measure(model, prefill_seqlens=(16, 64), warmup=1, repeats=2, decode_tokens=4, decode_prompt=8)
    assert result["macs_agree"] is True
    assert set(result["prefill"]) == {"16", "64"}
    for prefill in result["prefill"].values():
        assert prefill["min_ms"] <= prefill["median_ms"] <= prefill["max_ms"] and prefill["repeats"] == 2
    assert result["decode"]["new_tokens"] == 4 and result["decode"]["median_tokens_per_s"] > 0
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["weight_bytes"] == 4 * result["parameters"]
    memory = result["memory"]
    assert memory["peak_bytes"] >= memory["before_bytes"] > 0


def test_prefill_lengths_beyond_the_context_are_skipped():
    model = build_tiny_model("llama_gqa", max_position_embeddings=32)
    result = efficiency.measure(model, prefill_seqlens=(16, 64), macs_seqlen=16, warmup=0, repeats=1, decode_tokens=4)
    assert list(result["prefill"]) == ["16"]
    assert result["decode"]["prompt_tokens"] + 4 <= 32


def test_spread_reports_median_and_quartiles():
    result = timing.spread([0.004, 0.001, 0.003, 0.002, 0.010])
    assert result["median_ms"] == pytest.approx(3.0)
    assert result["min_ms"] == pytest.approx(1.0) and result["max_ms"] == pytest.approx(10.0)
    assert result["iqr_ms"] > 0
