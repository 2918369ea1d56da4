"""Head-dimension narrowing at runtime (modeling_lorap's HeadDimAttention): every head keeps fewer
query/key dims (whole RoPE pairs, chosen per KV group) and value dims, its projections stay dense.

A narrowed model must compute exactly what the dense model computes once the dims it dropped are
zeroed in place (the "padded" model: q/k rows removed set to 0, v rows of group g = [T_g^T W_v,g; 0],
o columns of head h = [W_o,h R_g, 0]), with eager and SDPA attention, with and without a KV cache,
while its cache holds only the narrowed dims; and it reloads without lorap.
"""
import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_ARCHITECTURES, build_tiny_model, tiny_config
from lorap import modeling_lorap
from lorap.architectures import Architecture
from lorap.families import family_of
from test_compress import assert_reloads_without_lorap

FAMILIES = sorted(TINY_ARCHITECTURES)
QKV = ("q_proj", "k_proj", "v_proj")


def _inputs(length=10):
    return torch.randint(0, 500, (2, length), generator=torch.Generator().manual_seed(3))


def _narrowing(config, seed=0) -> list:
    """Per layer: kept dims (different per layer and per KV group) and the value/output bases."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half, groups = head_dim // 2, config.num_key_value_heads
    layers = []
    for layer in range(config.num_hidden_layers):
        pairs_kept = half - 2 if layer == 0 else half // 2  # 2 of the pairs removed, then half of them
        v = head_dim - 3 if layer == 0 else head_dim // 2 - 1
        rope_index = []
        for _ in range(groups):
            pairs = sorted(torch.randperm(half, generator=generator)[:pairs_kept].tolist())
            rope_index.append(pairs + [i + half for i in pairs])
        layers.append(dict(
            qk_head_dim=2 * pairs_kept, v_head_dim=v, rope_index=rope_index,
            T=[torch.randn(head_dim, v, generator=generator) / head_dim**0.5 for _ in range(groups)],
            R=[torch.randn(head_dim, v, generator=generator) / head_dim**0.5 for _ in range(groups)],
        ))
    return layers


def _identity(config) -> list:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eye = torch.eye(head_dim)
    return [dict(qk_head_dim=head_dim, v_head_dim=head_dim,
                 rope_index=[list(range(head_dim))] * config.num_key_value_heads,
                 T=[eye] * config.num_key_value_heads, R=[eye] * config.num_key_value_heads)
            for _ in range(config.num_hidden_layers)]


def _split_qkv(state, prefix, config):
    """{q_proj/k_proj/v_proj: (weight, bias or None)} of one layer's dense attention."""
    if prefix + "qkv_proj.weight" in state:  # Phi-3: rows [q | k | v]
        head_dim = config.hidden_size // config.num_attention_heads
        sizes = [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2
        return dict(zip(QKV, ((w, None) for w in state[prefix + "qkv_proj.weight"].split(sizes))))
    return {name: (state[f"{prefix}{name}.weight"], state.get(f"{prefix}{name}.bias")) for name in QKV}


def _put_qkv(state, prefix, parts):
    if prefix + "qkv_proj.weight" in state:
        state[prefix + "qkv_proj.weight"] = torch.cat([parts[name][0] for name in QKV])
        return
    for name, (weight, bias) in parts.items():
        state[f"{prefix}{name}.weight"] = weight
        if bias is not None:
            state[f"{prefix}{name}.bias"] = bias


def _rows(tensor, rows):
    return None if tensor is None else tensor[rows]


def _narrowed_and_padded(dense, narrowing):
    """(state dict of the narrowed model, the padded dense model)."""
    config = dense.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // groups
    head_dim = dense.model.layers[0].self_attn.head_dim
    dense_state = dense.state_dict()
    narrowed_state, padded_state = dict(dense_state), dict(dense_state)
    for layer, spec in enumerate(narrowing):
        prefix = f"model.layers.{layer}.self_attn."
        parts = _split_qkv(dense_state, prefix, config)
        index = torch.tensor(spec["rope_index"])
        narrowed_state[prefix + "rope_index"] = index  # the kept dims are saved with the weights
        q_rows = torch.cat([h * head_dim + index[h // per_group] for h in range(heads)])
        k_rows = torch.cat([g * head_dim + index[g] for g in range(groups)])
        kept = {"q_proj": q_rows, "k_proj": k_rows}
        narrow, pad = {}, {}
        for name in ("q_proj", "k_proj"):
            weight, bias = parts[name]
            narrow[name] = (weight[kept[name]], _rows(bias, kept[name]))
            mask = torch.zeros(weight.shape[0], dtype=torch.bool)
            mask[kept[name]] = True
            pad[name] = (weight * mask[:, None], None if bias is None else bias * mask)
        v_weight, v_bias = parts["v_proj"]
        v_size = spec["v_head_dim"]
        zeros = torch.zeros(head_dim - v_size, v_weight.shape[1])
        narrow_v, pad_v, narrow_b, pad_b = [], [], [], []
        for g in range(groups):
            rows = slice(g * head_dim, (g + 1) * head_dim)
            reduced = spec["T"][g].T @ v_weight[rows]
            narrow_v.append(reduced)
            pad_v += [reduced, zeros]
            if v_bias is not None:
                reduced_bias = spec["T"][g].T @ v_bias[rows]
                narrow_b.append(reduced_bias)
                pad_b += [reduced_bias, torch.zeros(head_dim - v_size)]
        narrow["v_proj"] = (torch.cat(narrow_v), torch.cat(narrow_b) if narrow_b else None)
        pad["v_proj"] = (torch.cat(pad_v), torch.cat(pad_b) if pad_b else None)
        _put_qkv(narrowed_state, prefix, narrow)
        _put_qkv(padded_state, prefix, pad)

        o_weight = dense_state[prefix + "o_proj.weight"]
        narrow_o, pad_o = [], []
        for h in range(heads):
            reduced = o_weight[:, h * head_dim : (h + 1) * head_dim] @ spec["R"][h // per_group]
            narrow_o.append(reduced)
            pad_o += [reduced, torch.zeros(o_weight.shape[0], head_dim - v_size)]
        narrowed_state[prefix + "o_proj.weight"] = torch.cat(narrow_o, dim=1)
        padded_state[prefix + "o_proj.weight"] = torch.cat(pad_o, dim=1)
    padded = copy.deepcopy(dense)
    padded.load_state_dict(padded_state)
    return narrowed_state, padded


def _lorap_model(dense, narrowing, state):
    """The lorap model built from a config recording the narrowed layout as a checkpoint does (the head
    dimensions; the kept dims come with the weights), its weights loaded."""
    config = copy.deepcopy(dense.config)
    layers = [{key: spec[key] for key in ("qk_head_dim", "v_head_dim")} for spec in narrowing]
    config.lorap = {"layers": layers, "architecture": Architecture(config).record()}
    model = getattr(modeling_lorap, family_of(config).lorap_class)(config)
    model.load_state_dict(state)  # strict: every narrowed shape must match
    return model.eval()


def _set_attention(model, implementation):
    model.config._attn_implementation = implementation


def _case(arch, narrowing_of=_narrowing):
    dense = build_tiny_model(arch)
    narrowing = narrowing_of(dense.config)
    state, padded = _narrowed_and_padded(dense, narrowing)
    return dense, narrowing, _lorap_model(dense, narrowing, state), padded.eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_narrowed_heads_compute_the_padded_dense_model(arch, implementation):
    _, narrowing, narrowed, padded = _case(arch)
    assert isinstance(narrowed.model.layers[0].self_attn, modeling_lorap.HeadDimAttention)
    for model in (narrowed, padded):
        _set_attention(model, implementation)
    inputs = _inputs()
    with torch.no_grad():
        expected = padded(inputs).logits
        assert (narrowed(inputs, use_cache=False).logits - expected).abs().max() <= 1e-5
        # prefill into a cache, then three tokens read from it
        prefill = narrowed(inputs[:, :-3], use_cache=True)
        cache = prefill.past_key_values
        step = narrowed(inputs[:, -3:], past_key_values=cache, use_cache=True).logits
    assert (step - expected[:, -3:]).abs().max() <= 1e-5
    for layer, spec in enumerate(narrowing):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert keys.shape[1:] == (len(spec["rope_index"]), inputs.shape[1], spec["qk_head_dim"])
        assert values.shape[1:] == (len(spec["rope_index"]), inputs.shape[1], spec["v_head_dim"])

    prompt = inputs[:1, :6]
    settings = dict(max_new_tokens=5, do_sample=False, use_cache=True, attention_mask=torch.ones_like(prompt))
    assert torch.equal(narrowed.generate(prompt, **settings), padded.generate(prompt, **settings))


def test_sdpa_over_a_prompt_pads_to_one_head_size(monkeypatch):
    """The padded call (PyTorch's fused CPU kernel needs one head size) is the one the test above checks
    against the dense model: it runs for a prompt under SDPA, never for a single decode query or eager."""
    _, _, narrowed, _ = _case("llama_gqa")
    calls = []
    original = modeling_lorap.HeadDimAttention._pads_to_one_head_size

    def recorded(self, query):
        calls.append((self.config._attn_implementation, query.shape[-2], original(self, query)))
        return calls[-1][-1]

    monkeypatch.setattr(modeling_lorap.HeadDimAttention, "_pads_to_one_head_size", recorded)
    inputs = _inputs()[:1]
    with torch.no_grad():
        for implementation in ("sdpa", "eager"):
            _set_attention(narrowed, implementation)
            cache = narrowed(inputs[:, :-1], use_cache=True).past_key_values
            narrowed(inputs[:, -1:], past_key_values=cache, use_cache=True)
    layers = narrowed.config.num_hidden_layers
    prompt = inputs.shape[1] - 1
    assert calls == [("sdpa", prompt, True)] * layers + [("sdpa", 1, False)] * layers \
        + [("eager", prompt, False)] * layers + [("eager", 1, False)] * layers


@pytest.mark.parametrize("arch", FAMILIES)
def test_keeping_every_dim_is_the_dense_model(arch):
    dense, _, narrowed, _ = _case(arch, _identity)
    assert type(narrowed.model.layers[1].self_attn).__name__.endswith("HeadDimAttention")
    with torch.no_grad():
        assert (narrowed(_inputs()).logits - dense(_inputs()).logits).abs().max() <= 1e-5


def test_rope_indices_are_saved_with_the_weights():
    _, narrowing, narrowed, _ = _case("llama_gqa")
    attention = narrowed.model.layers[0].self_attn
    assert torch.equal(attention.rope_index, torch.tensor(narrowing[0]["rope_index"]))
    assert torch.equal(narrowed.state_dict()["model.layers.0.self_attn.rope_index"], attention.rope_index)
    assert not [name for name, _ in narrowed.named_parameters() if "rope_index" in name]


def test_partial_rotary_is_refused():
    config = tiny_config("phi3", partial_rotary_factor=0.5)
    dense = build_tiny_model("phi3", partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match="full rotary"):
        _lorap_model(dense, _narrowing(config), dense.state_dict())


def test_malformed_rope_index_is_refused():
    dense = build_tiny_model("llama_gqa")
    narrowing = _narrowing(dense.config)
    narrowing[0]["rope_index"][1] = narrowing[0]["rope_index"][1][::-1]  # pairs no longer in order
    config = copy.deepcopy(dense.config)
    config.lorap = {"layers": narrowing, "architecture": Architecture(config).record()}
    with pytest.raises(ValueError, match="rope_index"):
        getattr(modeling_lorap, family_of(config).lorap_class)(config)


def test_narrowed_checkpoint_reloads_without_lorap(tmp_path):
    _, narrowing, narrowed, _ = _case("qwen2")  # q/k/v biases narrowed too
    narrowed.config.auto_map = {"AutoModelForCausalLM": f"modeling_lorap.{type(narrowed).__name__}"}
    folder = tmp_path / "narrowed"
    narrowed.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(modeling_lorap.__file__, folder / "modeling_lorap.py")
    with safe_open(folder / "model.safetensors", "pt") as saved:
        assert saved.get_tensor("model.layers.1.self_attn.rope_index").tolist() == narrowing[1]["rope_index"]
        assert saved.get_tensor("model.layers.1.self_attn.k_proj.bias").shape == (2 * narrowing[1]["qk_head_dim"],)
    assert json.loads((folder / "config.json").read_text())["lorap"]["layers"][0]["qk_head_dim"] == 12
    inputs = _inputs()
    with torch.no_grad():
        expected = narrowed(inputs).logits
    assert_reloads_without_lorap(folder, inputs, expected, tmp_path)
