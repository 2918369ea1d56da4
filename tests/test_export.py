"""`lorap export`: GGUF and DeciLM outputs hold exactly the compressed model, in the layout the
engines read; bad input is refused before anything is written.

The GGUF file is read back with the `gguf` package and rebuilt into a dense transformers model with
the per-layer shapes the file declares (q/k rows put back in HF's rotary order): its logits must be
the lorap model's. tests/test_export_llamacpp.py runs the same files in llama.cpp itself. The checkpoints
are conftest.py's `compressed_dirs`.
"""
import json

import numpy as np
import pytest
import torch

from lorap import api
from lorap.cli import main
from lorap.export.gguf_file import interleave_rotary_halves
from conftest import build_tiny_model

pytest.importorskip("gguf")


def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key):
        field = reader.fields[key]
        if field.types[0].name == "STRING":
            return bytes(field.parts[field.data[0]]).decode()
        values = [field.parts[i].tolist()[0] for i in field.data]
        return values if field.types[0].name == "ARRAY" else values[0]

    tensors = {t.name: torch.from_numpy(np.array(t.data).astype(np.float32)).reshape(list(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return value, tensors


def model_from_gguf(path):
    """A transformers LLaMA built from the GGUF file alone: per-layer widths and heads as the file says."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorap.modeling_lorap import apply_layout

    value, tensors = read_gguf(path)
    arch = value("general.architecture")
    layers = value(f"{arch}.block_count")
    per_layer = lambda key: (lambda v: v if isinstance(v, list) else [v] * layers)(value(f"{arch}.{key}"))
    widths, heads, kv_heads = per_layer("feed_forward_length"), per_layer("attention.head_count"), per_layer(
        "attention.head_count_kv")
    config = LlamaConfig(vocab_size=value(f"{arch}.vocab_size"), hidden_size=value(f"{arch}.embedding_length"),
                         intermediate_size=max(widths), num_hidden_layers=layers, num_attention_heads=heads[0],
                         num_key_value_heads=kv_heads[0], rms_norm_eps=value(f"{arch}.attention.layer_norm_rms_epsilon"),
                         rope_theta=value(f"{arch}.rope.freq_base"), tie_word_embeddings="output.weight" not in tensors,
                         max_position_embeddings=value(f"{arch}.context_length"))
    qkv_bias = "blk.0.attn_q.bias" in tensors
    config.attention_bias = qkv_bias  # LLaMA's switch also gives o a bias, zeroed below
    model = LlamaForCausalLM(config)
    apply_layout(model, [{"intermediate_size": w, "down_proj_bias": f"blk.{i}.ffn_down.bias" in tensors}
                         for i, w in enumerate(widths)])
    if qkv_bias:
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    names = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
             "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
             "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
             "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
             "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
             "attn_v.bias": "self_attn.v_proj.bias"}
    state = {}
    for name, tensor in tensors.items():
        if name == "token_embd.weight":
            state["model.embed_tokens.weight"] = tensor
        elif name == "output_norm.weight":
            state["model.norm.weight"] = tensor
        elif name == "output.weight":
            state["lm_head.weight"] = tensor
        else:
            _, index, local = name.split(".", 2)
            if local.startswith(("attn_q.", "attn_k.")):  # undo the GGML rotary order
                count = heads[int(index)] if local.startswith("attn_q.") else kv_heads[int(index)]
                half = tensor.shape[0] // count // 2
                tensor = tensor.reshape(count, half, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
            state[f"model.layers.{index}.{names[local]}"] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and {m for m in missing if not m.endswith("o_proj.bias")} <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval(), value


def lorap_logits(folder, ids):
    model, _ = api.load(folder, fuse=False)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_rotary_reorder_is_a_permutation_of_each_heads_rows():
    weight = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows
    reordered = interleave_rotary_halves(weight, 2)
    # per head, rows (0, 2, 1, 3): each first-half row is followed by its second-half partner
    assert torch.equal(reordered[:4], weight[[0, 2, 1, 3]]) and torch.equal(reordered[4:], weight[[4, 6, 5, 7]])


@pytest.mark.parametrize("name", ["best", "paper", "ffn-only", "lstsq", "qwen2-best", "headdim", "qwen2-headdim",
                                  "svd-llm", "shortgpt"])
def test_gguf_holds_the_compressed_model(compressed_dirs, tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    assert main(["export", str(compressed_dirs[name]), "--format", "gguf", "--out", str(out), "--dtype", "f32",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    rebuilt, value = model_from_gguf(out)
    with torch.no_grad():
        assert torch.allclose(rebuilt(IDS).logits, lorap_logits(compressed_dirs[name], IDS), atol=2e-4, rtol=1e-4)
    layout = json.loads((compressed_dirs[name] / "config.json").read_text())["lorap"]["layers"]
    widths = [layer["intermediate_size"] for layer in layout]
    assert report["layers"]["ffn_widths"] == widths
    expected_arch = "llama" if len(set(widths)) == 1 else "deci"
    assert value("general.architecture") == report["architecture"] == expected_arch
    if expected_arch == "deci":
        assert value("deci.feed_forward_length") == widths
    assert value("tokenizer.ggml.model") == "gpt2" and len(value("tokenizer.ggml.tokens")) == 512
    ranks = [layer.get(p) for layer in layout for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                          "down_proj")]  # (the FFN's: SVD-LLM)
    pairs = sum(rank is not None for rank in ranks)
    assert report["parameters"]["merged_factor_pairs"] == pairs
    assert (report["parameters"]["added_back_by_merging"] > 0) == (pairs > 0)
    narrowed = [layer for layer in layout if "qk_head_dim" in layer]
    assert report["parameters"]["padded_layers"] == len(narrowed)
    assert (report["parameters"]["added_by_padding_heads"] > 0) == bool(narrowed)
    assert report["parameters"]["exported"] == report["parameters"]["checkpoint"] + report["parameters"][
        "added_back_by_merging"] + report["parameters"]["added_by_padding_heads"]


def test_gguf_f16_is_close_and_half_the_size(compressed_dirs, tmp_path):
    folder = compressed_dirs["ffn-only"]
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "a.gguf"), "--dtype", "f32"]) == 0
    assert main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "b.gguf")]) == 0
    rebuilt, _ = model_from_gguf(tmp_path / "b.gguf")
    with torch.no_grad():
        assert torch.allclose(rebuilt(IDS).logits, lorap_logits(folder, IDS), atol=5e-2)
    assert (tmp_path / "b.gguf").stat().st_size < 0.75 * (tmp_path / "a.gguf").stat().st_size


def decilm_logits(folder, ids):
    """The DeciLM folder's weights in a LLaMA of the per-layer widths an engine derives from block_configs."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from lorap.export.decilm import round_up
    from lorap.modeling_lorap import apply_layout

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    widths = []
    for block in config.block_configs:  # as vLLM's DeciLMDecoderLayer reads them: attributes
        assert block.attention.no_op is False and block.ffn.no_op is False
        widths.append(round_up(int(2 * block.ffn.ffn_mult * config.hidden_size / 3)) if hasattr(block.ffn, "ffn_mult")
                      else block.ffn.intermediate_size)
    kv = config.num_attention_heads // config.block_configs[0].attention.n_heads_in_group
    llama = LlamaConfig(**{**config.to_dict(), "model_type": "llama", "num_key_value_heads": kv,
                           "intermediate_size": max(widths), "attention_bias": config.qkv_bias})
    model = LlamaForCausalLM(llama)
    apply_layout(model, [{"intermediate_size": w, "down_proj_bias": config.mlp_bias} for w in widths])
    if config.qkv_bias:  # as vLLM reads it: q/k/v biases from qkv_bias, none on o (attention_bias false)
        assert config.attention_bias is False
        for layer in model.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    if config.mlp_bias:
        for layer in model.model.layers:
            for name in ("gate_proj", "up_proj"):
                old = getattr(layer.mlp, name)
                setattr(layer.mlp, name, torch.nn.Linear(old.in_features, old.out_features, bias=True))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and {m for m in missing if not m.endswith("o_proj.bias")} <= {"lm_head.weight"}
    model.tie_weights()
    with torch.no_grad():
        return model.eval()(ids).logits, widths


def test_decilm_refuses_widths_engines_would_misread_then_pads_them_exactly(compressed_dirs, tmp_path, capsys):
    folder = compressed_dirs["best"]  # exact mode, align 1: odd widths
    out = tmp_path / "deci"
    assert main(["export", str(folder), "--format", "decilm", "--out", str(out)]) == 2
    assert "multiples of 256" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind
    assert main(["export", str(folder), "--format", "decilm", "--out", str(out), "--ffn-multiple", "pad",
                 "--json", str(tmp_path / "r.json")]) == 0
    logits, widths = decilm_logits(out, IDS)
    assert all(w % 256 == 0 for w in widths)
    assert torch.allclose(logits, lorap_logits(folder, IDS), atol=1e-2, rtol=1e-3)  # f16 weights
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["padded_channels"] == sum(widths) - sum(report["layers"]["ffn_widths"]) > 0


@pytest.mark.parametrize("name", ["best", "qwen2-best"])
def test_decilm_intermediate_size_keeps_the_widths(compressed_dirs, tmp_path, name):
    out = tmp_path / "deci"
    assert main(["export", str(compressed_dirs[name]), "--format", "decilm", "--out", str(out), "--dtype", "f32",
                 "--ffn-multiple", "intermediate-size"]) == 0
    logits, widths = decilm_logits(out, IDS)
    layout = json.loads((compressed_dirs[name] / "config.json").read_text())["lorap"]["layers"]
    assert widths == [layer["intermediate_size"] for layer in layout]
    assert torch.allclose(logits, lorap_logits(compressed_dirs[name], IDS), atol=2e-4, rtol=1e-4)


def test_decilm_refuses_a_head_pruned_model_and_points_to_gguf(compressed_dirs, tmp_path, capsys):
    out = tmp_path / "deci"
    assert main(["export", str(compressed_dirs["heads"]), "--format", "decilm", "--out", str(out),
                 "--ffn-multiple", "intermediate-size"]) == 2  # (its FFN widths would be refused first)
    error = capsys.readouterr().err
    assert "one query-head count" in error and "--format gguf" in error and not out.exists()


def test_bad_input_is_refused_and_nothing_is_written(compressed_dirs, tmp_path, tiny_tokenizer, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["export", str(compressed_dirs["paper"]), "--format", "gguf", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    plain = tmp_path / "plain"
    build_tiny_model("llama_gqa").save_pretrained(plain)
    tiny_tokenizer.save_pretrained(plain)
    assert main(["export", str(plain), "--format", "gguf", "--out", str(tmp_path / "p.gguf")]) == 2
    assert "not a lorap checkpoint" in capsys.readouterr().err
    gemma = tmp_path / "gemma"
    build_tiny_model("gemma").save_pretrained(gemma)
    tiny_tokenizer.save_pretrained(gemma)
    api.compress(str(gemma), tmp_path / "gemma-c", ratio=0.3, progress=False, calibration_samples=8,
                 calibration_seqlen=32, predict_speed=False)
    assert main(["export", str(tmp_path / "gemma-c"), "--format", "gguf", "--out", str(tmp_path / "g.gguf")]) == 2
    assert "cannot express" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma", "gemma-c", "m.gguf", "plain"]
