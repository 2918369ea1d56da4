"""Head-dimension narrowing (--attention headdim): the method's choices, the plan's shapes and KV
cache, and compressed checkpoints of every family that reload (with and without lorap)."""
import json

import pytest
import torch

from conftest import TINY_ARCHITECTURES, build_tiny_model, tiny_config
from lorap import api
from lorap.errors import LorapError
from lorap.methods.head_dims import narrow_head_dims, pair_scores, refit_output, updated, whitened_moments
from lorap.methods.head_pruning import HeadLayout
from lorap.pipeline.layer_step import AttentionView
from lorap.architectures import Architecture
from lorap.pipeline.statistics import ProjectionInputs
from lorap.plan.plan import PlanSettings, make_plan

SMALL = dict(calibration_samples=8, calibration_seqlen=32, batch_size=4)


def _inputs_of(x: torch.Tensor) -> ProjectionInputs:
    x = x.double()
    return ProjectionInputs(norm=x.pow(2).sum(0).sqrt(), mean=x.mean(0), gram=x.T @ x, tokens=x.shape[0])


def _correlated_inputs(width: int, tokens: int = 2000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64) * 0.3
    return torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mixing + 0.2


def _layout(config) -> HeadLayout:
    plan = make_plan(config, PlanSettings(ratio=0.2, sublayers=("ffn",)))
    return HeadLayout.of(plan)


@pytest.mark.parametrize("arch", ["llama_mha", "qwen2", "phi3"])
def test_keeping_every_dimension_changes_nothing(arch):
    model = build_tiny_model(arch)
    layout = _layout(model.config)
    layer = model.model.layers[0]
    architecture = Architecture(model.config)
    x = _correlated_inputs(model.config.hidden_size)
    narrowed = narrow_head_dims(AttentionView(architecture, layer), _inputs_of(x), layout, layout.head_dim, layout.head_dim)
    assert narrowed.dropped_pair_score == 0 and narrowed.dropped_value_energy < 1e-12
    attention = AttentionView(architecture, layer)
    xs = x.float()
    for name in ("q_proj", "k_proj"):  # every pair kept, in its place
        assert torch.equal(narrowed.projections[name].weight, getattr(attention, name).weight)
    dense_vo = _value_output(attention.v_proj, attention.o_proj, xs, layout)
    narrowed_vo = _value_output(narrowed.projections["v_proj"], narrowed.projections["o_proj"], xs, layout)
    assert (dense_vo - narrowed_vo).abs().max() <= 1e-4 * dense_vo.abs().max()


def _value_output(v_proj, o_proj, x, layout: HeadLayout) -> torch.Tensor:
    """What the heads add to the residual if every token attends to itself alone."""
    with torch.no_grad():
        values = v_proj(x).reshape(len(x), layout.kv_heads, -1)
        per_head = values.repeat_interleave(layout.heads_per_group, 1).reshape(len(x), -1)
        return torch.nn.functional.linear(per_head, o_proj.weight)


def _head_outputs(v_proj, o_proj, x, layout: HeadLayout, group: int) -> torch.Tensor:
    """Each of a group's query heads' map through its values to the residual, side by side: heads
    weigh the shared values by attention weights of their own, so each map counts on its own."""
    with torch.no_grad():
        values = v_proj(x).reshape(len(x), layout.kv_heads, -1)[:, group].double()
        width = values.shape[1]
        heads = range(group * layout.heads_per_group, (group + 1) * layout.heads_per_group)
        weight = o_proj.weight.double()
        return torch.cat([values @ weight[:, head * width : (head + 1) * width].T for head in heads], dim=1)


def test_the_value_basis_drops_what_its_singular_values_say():
    """Per KV group, the squared error of the narrowed value-to-output map on the calibration inputs is
    the energy of the dropped singular values (the truncation is optimal for the whitened map)."""
    model = build_tiny_model("llama_gqa")
    layout = _layout(model.config)
    attention = AttentionView(Architecture(model.config), model.model.layers[1])
    x = _correlated_inputs(model.config.hidden_size)
    kept = layout.head_dim // 2
    narrowed = narrow_head_dims(attention, _inputs_of(x), layout, layout.head_dim, kept)
    xs = x.float()
    group_errors, group_totals = 0.0, 0.0
    for group in range(layout.kv_heads):
        dense = _head_outputs(attention.v_proj, attention.o_proj, xs, layout, group)
        new = _head_outputs(narrowed.projections["v_proj"], narrowed.projections["o_proj"], xs, layout, group)
        group_errors += float((dense - new).pow(2).sum())
        group_totals += float(dense.pow(2).sum())
    assert group_errors / group_totals == pytest.approx(narrowed.dropped_value_energy, rel=1e-3)
    assert 0 < narrowed.dropped_value_energy < 0.5


def _attended_o_inputs(v_proj, x, layout: HeadLayout) -> torch.Tensor:
    """o_proj's input as attention makes it: each query head averages its group's values over a causal
    window of its own length (weights summing to one), so heads differ and tokens mix."""
    with torch.no_grad():
        values = v_proj(x).reshape(len(x), layout.kv_heads, -1).double()
    heads = []
    for head in range(layout.kv_heads * layout.heads_per_group):
        group_values = values[:, head // layout.heads_per_group]
        window = 1 + 3 * head
        sums = group_values.cumsum(0)
        shifted = torch.cat([torch.zeros(window, sums.shape[1], dtype=sums.dtype), sums[:-window]])
        counts = torch.arange(1, len(x) + 1, dtype=sums.dtype).clamp(max=window)[:, None]
        heads.append((sums - shifted) / counts)
    return torch.cat(heads, dim=1)


def test_the_least_squares_update_fits_o_proj_to_its_dense_output_better_than_the_basis():
    """With the values narrowed, o_proj refitted over its own (attended) inputs reproduces the dense
    output with less error on those inputs than the columns the value basis gives; with nothing
    narrowed it is o_proj itself, and a large ridge keeps the basis columns."""
    model = build_tiny_model("llama_gqa")
    layout = _layout(model.config)
    attention = AttentionView(Architecture(model.config), model.model.layers[1])
    x = _correlated_inputs(model.config.hidden_size)
    o_inputs = _attended_o_inputs(attention.v_proj, x.float(), layout)
    kept = layout.head_dim // 2
    basis_only = narrow_head_dims(attention, _inputs_of(x), layout, layout.head_dim, kept)
    narrowed = {update: updated(basis_only, attention.o_proj, update, _inputs_of(o_inputs), {"lstsq_ridge": 1e-9})
                for update in ("none", "lstsq")}
    assert torch.equal(narrowed["none"].projections["v_proj"].weight, narrowed["lstsq"].projections["v_proj"].weight)
    to_values = basis_only.to_values  # each query head's change of value basis
    narrowed_inputs = o_inputs @ to_values.T
    dense_output = o_inputs @ attention.o_proj.weight.double().T
    residuals = {update: dense_output - narrowed_inputs @ result.projections["o_proj"].weight.double().T
                 for update, result in narrowed.items()}
    assert residuals["lstsq"].pow(2).sum() < 0.95 * residuals["none"].pow(2).sum()
    # the normal equations: what is left of the dense output is orthogonal to every narrowed input
    orthogonality = (narrowed_inputs.T @ residuals["lstsq"]).abs().max() / (narrowed_inputs.T @ dense_output).abs().max()
    assert orthogonality < 1e-5
    dense_weight, identity = attention.o_proj.weight.double(), torch.eye(o_inputs.shape[1], dtype=torch.float64)
    assert torch.allclose(refit_output(dense_weight, dense_weight, identity, _inputs_of(o_inputs)), dense_weight)
    # a large ridge keeps the basis columns
    columns = narrowed["none"].projections["o_proj"].weight.double()
    held = refit_output(dense_weight, columns, to_values, _inputs_of(o_inputs), lstsq_ridge=1e9)
    assert torch.allclose(held, columns, atol=1e-6)


def test_query_key_pairs_are_kept_whole_by_their_scores():
    model = build_tiny_model("qwen2")
    layout = _layout(model.config)
    attention = AttentionView(Architecture(model.config), model.model.layers[0])
    inputs = _inputs_of(_correlated_inputs(model.config.hidden_size))
    kept = layout.head_dim - 4  # two pairs go
    narrowed = narrow_head_dims(attention, inputs, layout, kept, layout.head_dim)
    scores = pair_scores(attention, whitened_moments(inputs), layout)
    half = layout.head_dim // 2
    for group, index in enumerate(narrowed.rope_index.tolist()):
        first, second = index[: kept // 2], index[kept // 2 :]
        assert second == [i + half for i in first] and first == sorted(first)
        dropped = sorted(set(range(half)) - set(first))
        assert max(scores[group, dropped]) <= min(scores[group, first])
    rows = narrowed.rope_index[0].tolist()
    assert torch.equal(narrowed.projections["k_proj"].weight[:kept], attention.k_proj.weight[rows])
    assert torch.equal(narrowed.projections["k_proj"].bias[:kept], attention.k_proj.bias[rows])


def test_a_shrink_moves_the_value_basis_toward_the_inputs_diagonal():
    """--whitening-shrink s chooses the values from (1 - s) E[x x^T] + s diag(E[x x^T]) (at 1 the channel
    correlations of the calibration text count for nothing) and the query/key pairs from E[x x^T] as it is;
    the config hands s to the criterion."""
    x = _correlated_inputs(8)
    inputs = _inputs_of(x)
    second = x.T @ x / len(x)
    assert torch.allclose(whitened_moments(inputs).for_values().second, second)
    half = whitened_moments(inputs, whitening_shrink=0.5)
    assert torch.allclose(half.second, second)
    assert torch.allclose(half.for_values().second, (second + torch.diag(second.diagonal())) / 2)
    assert torch.allclose(whitened_moments(inputs, whitening_shrink=1.0).for_values().second, torch.diag(second.diagonal()))
    model = build_tiny_model("llama_gqa")
    layout = _layout(model.config)
    attention = AttentionView(Architecture(model.config), model.model.layers[0])
    inputs = _inputs_of(_correlated_inputs(model.config.hidden_size))
    plain, shrunk = (narrow_head_dims(attention, inputs, layout, layout.head_dim - 4, layout.head_dim // 2,
                                      options={"whitening_shrink": shrink}) for shrink in (0.0, 1.0))
    assert torch.equal(plain.rope_index, shrunk.rope_index)  # the same query/key pairs
    assert not torch.allclose(plain.projections["v_proj"].weight, shrunk.projections["v_proj"].weight)
    from lorap.methods.presets import config_for

    best = config_for("best", ratio=0.2, attention="headdim")
    assert best.options_of("head_dim_score") == {"whitening_shrink": 0.5}  # best's shrink, for heads as for pairs
    assert config_for("modegpt", ratio=0.2).options_of("head_dim_score") == {"whitening_shrink": 0.0}  # as published


def test_the_plan_narrows_heads_and_their_cache():
    config = tiny_config("llama_gqa")
    plan = make_plan(config, PlanSettings(ratio=0.3, attention="headdim", allocation_a=1.0))
    layer = plan.layers[0]
    assert layer.qk_head_dim % 2 == 0 and layer.qk_head_dim < 16 and layer.v_head_dim < 16
    cache = plan.to_dict()["totals"]["kv_cache_values_per_token"]
    assert cache["compressed"] == 2 * 2 * (layer.qk_head_dim + layer.v_head_dim)  # 2 layers x 2 KV heads
    assert cache["dense"] == 2 * 2 * 2 * 16
    rows = {row["module"]: row for row in plan.rows if row["layer"] == 0}
    assert rows["q_proj"]["shape"] == [4 * layer.qk_head_dim, 64] and rows["o_proj"]["shape"] == [64, 4 * layer.v_head_dim]
    assert plan.layout()[0]["qk_head_dim"] == layer.qk_head_dim


def test_a_head_dimension_too_small_for_the_budget_is_refused():
    config = tiny_config("llama_gqa")
    with pytest.raises(LorapError, match="query/key pair"):
        make_plan(config, PlanSettings(ratio=0.9, attention="headdim", sublayers=("attention",)))


def test_an_alignment_that_leaves_every_head_whole_is_refused():
    # heads of 16 dimensions at 20%: 12.8 kept each side, which multiples of 8 round back to 16
    config = tiny_config("llama_gqa")
    with pytest.raises(LorapError, match="would narrow no head.*--align 1"):
        make_plan(config, PlanSettings(ratio=0.2, attention="headdim", allocation_a=1.0, align=16))
    # the default alignment moves on to a multiple that narrows them
    plan = make_plan(config, PlanSettings(ratio=0.2, attention="headdim", allocation_a=1.0))
    assert plan.settings.align == 1
    assert all((layer.qk_head_dim, layer.v_head_dim) == (12, 13) for layer in plan.layers)


def test_a_headdim_compression_that_narrows_nothing_fails_before_any_weight_loads(tmp_path, tiny_tokenizer):
    source = tmp_path / "dense"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    for weights in source.glob("*.safetensors"):  # the refusal must come from the config alone
        weights.unlink()
    out = tmp_path / "out"
    with pytest.raises(LorapError, match="would narrow no head"):
        api.compress(str(source), str(out), preset="best", attention="headdim", ratio=0.2, align=16, progress=False)
    assert not out.exists()


def test_partial_rotary_is_refused_before_any_weight_loads():
    config = tiny_config("phi3", partial_rotary_factor=0.5)
    with pytest.raises(LorapError, match="RoPE"):
        make_plan(config, PlanSettings(ratio=0.2, attention="headdim"))


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_a_narrowed_checkpoint_reloads_and_caches_fewer_values(arch, tmp_path, tiny_tokenizer):
    source = tmp_path / "dense"
    build_tiny_model(arch, vocab_size=len(tiny_tokenizer)).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    out = tmp_path / "narrowed"
    # -a 3: value and query/key heads of two sizes, the harder case for the runtime and the caches
    result = api.compress(str(source), out, preset="best", attention="headdim", allocation_a=3.0, ratio=0.2,
                          mode="reference", align=1, progress=False, stream=False, predict_speed=False, **SMALL)
    layers = json.loads((out / "config.json").read_text())["lorap"]["layers"]
    head_dim = result.model.model.layers[0].self_attn.head_dim
    assert all(layer["qk_head_dim"] + layer["v_head_dim"] < 2 * head_dim for layer in layers)
    inputs = torch.randint(0, len(tiny_tokenizer), (2, 12))
    reloaded, _ = api.load(out)
    with torch.no_grad():
        expected = result.model(inputs).logits
        assert (reloaded(inputs).logits - expected).abs().max() <= 1e-5
        cache = reloaded(inputs, use_cache=True).past_key_values
    plan = result.report["plan"]["totals"]["kv_cache_values_per_token"]
    cached = sum(layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1]) for layer in cache.layers)
    assert cached == plan["compressed"] < plan["dense"]
    from lorap.evaluate import efficiency

    assert efficiency.kv_cache_bytes_per_token(reloaded) == 4 * plan["compressed"]  # float32
    # transformers' static cache (what generate() compiles with, as engines run decode) preallocates each
    # layer's keys and values: narrowed heads whose value and query/key sizes differ still fit it
    assert any(layer["qk_head_dim"] != layer["v_head_dim"] for layer in layers)
    prompt = {"input_ids": inputs[:1, :6], "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        dynamic = reloaded.generate(**prompt, **greedy)
        static = reloaded.generate(**prompt, **greedy, cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert efficiency.counted_macs_per_token(reloaded, 16) == efficiency.macs_per_token(reloaded, 16)["total"]
    if arch == "llama_gqa":  # in plain transformers, without lorap (one family: a subprocess costs seconds)
        from test_compress import assert_reloads_without_lorap

        assert_reloads_without_lorap(out, inputs, expected, tmp_path)
