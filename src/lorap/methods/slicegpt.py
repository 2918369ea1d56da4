"""SliceGPT (Ashkboos et al. 2024, arXiv 2401.15024) as a rival baseline: delete rows and columns of
every weight matrix by slicing the residual stream in a PCA basis.

The method, in the order slice_model runs it:

1. Norm fusion. An RMSNorm computes g * x / rms(x); its weight g is multiplied into the columns of the
   linears that read its output (q/k/v after input_layernorm, gate/up after post_attention_layernorm,
   lm_head after the final norm). What is left, x / rms(x), commutes with any orthogonal Q:
   ||x Q|| = ||x||. That is what makes the rotation exact.
2. Rotation and slicing, block by block (attention and MLP of each layer separately). The input of each
   block, the residual stream in dense coordinates, is collected over the calibration tokens; its
   Gram matrix (float64) gives the orthogonal basis Q of its principal directions, by descending
   eigenvalue. The stream is carried in that basis and only its first d' coordinates are kept:
   the linears reading the stream get W Q[:, :d'], the linear writing to it (o_proj, down_proj) gets
   Q_next[:, :d']^T W, and the residual path crosses from this block's basis to the next one through
   the shortcut matrix Q_this[:, :d']^T Q_next[:, :d'] (d' x d'). The embedding becomes E Q_0[:, :d'].
   Each block's basis is computed from activations of the model sliced so far (the paper's choice:
   later blocks see, and are fitted to, the error of earlier ones).
3. The norms become weightless and, over the d' dims they now see, divide the sum of squares by the
   dense hidden size (as the reference implementation does): with d' = d the model is the dense one
   up to rounding, and with d' < d the norm is the dense one of the stream's projection.
4. The head. As in the reference implementation's default, the final residual stream is *not*
   sliced (its last block writes all d dims, in the PCA basis of the final hidden state), so the last
   layer's down_proj keeps d rows and its MLP shortcut is d' x d. `slice_head=True` slices it too.

Tied embeddings (the built-in SmolLM2-135M ties embed_tokens and lm_head): after fusion the head reads
g_final * x in the final basis while the embedding writes in the first basis, so one matrix cannot
serve both. `tied_head="untie"` (the reference implementation, the paper's numbers) gives the head its
own vocab x d_final matrix, which costs a whole extra vocabulary matrix. `tied_head="keep"` (lorap's
variant, not in the paper) keeps one shared vocab x d' matrix E Q_0[:, :d'] and ends the final norm
with `head_in` = Q_0[:, :d']^T diag(g_final) Q_L[:, :d_final]: d' x d_final parameters instead of
vocab x d_final; exact at d' = d, and with d' < d the head sees the embedding's first d' principal
directions only.

Attention is untouched: its heads, GQA groups and RoPE live between q/k/v and o_proj, where nothing is
rotated; only the decoder layer's residual wiring and its norms change (modeling_sliced.py).
"""
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import modeling_sliced
from ..errors import LorapError
from ..families import attention_shapes, ffn_shapes, other_parameters
from ..plan.counting import count_parameters, linear_parameters

SUPPORTED = ("llama", "mistral", "qwen2")
TIED_HEAD_CHOICES = ("untie", "keep")
ROUND_MULTIPLE = 8  # d' is rounded to a multiple of this where that stays within ROUND_TOLERANCE
ROUND_TOLERANCE = 0.005  # of the share of parameters removed (half a percentage point)
KEEP_GATED_BYTES = 2 << 30  # the FFN's gated activations over all calibration tokens are kept up to this
MODELING_FILE = Path(modeling_sliced.__file__).name  # modeling_sliced.py, copied into every sliced checkpoint
_WHY_NOT = {
    "phi3": "its q/k/v and gate/up are fused linears",
    "gemma": "its RMSNorm scales by (1 + weight) and its embeddings are scaled inside the model",
}


# ---------------------------------------------------------------- checks (before any work)


def check_supported(model) -> None:
    """Refuse, with a LorapError and before any work, a model slice_model cannot turn into a sliced one."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        why = _WHY_NOT.get(model_type, "it is not a LLaMA-family decoder lorap's SliceGPT knows")
        raise LorapError(
            f"SliceGPT does not support model type '{model_type}' ({why}); it supports {', '.join(SUPPORTED)}"
        )
    if getattr(config, modeling_sliced.LAYOUT_KEY, None) is not None:
        raise LorapError("this model is already sliced by SliceGPT; slice the dense model instead")
    if getattr(config, "lorap", None) is not None:
        raise LorapError("this model is a lorap-compressed checkpoint; SliceGPT needs the dense model")
    d = config.hidden_size
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "embed_tokens", None), nn.Embedding) \
            or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise LorapError(f"{type(model).__name__} does not have the layout of a {model_type} causal LM")
    for index, layer in enumerate(inner.layers):
        linears = [getattr(layer.self_attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(m) is nn.Linear for m in linears) or not all(
            getattr(n, "weight", None) is not None and n.weight.shape == (d,) for n in norms
        ):
            raise LorapError(f"layer {index} is not a dense {model_type} layer (already compressed?)")


def check_calibration(batches, vocab_size: int) -> list:
    if not isinstance(batches, (list, tuple)) or not batches:
        raise LorapError("SliceGPT needs calibration: a non-empty list of token-id batches [batch, tokens]")
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.numel() == 0 \
                or batch.dtype not in (torch.int64, torch.int32):
            raise LorapError("each calibration batch must be a 2-D integer tensor of token ids [batch, tokens]")
        if int(batch.min()) < 0 or int(batch.max()) >= vocab_size:
            raise LorapError(f"calibration token ids must lie in [0, {vocab_size})")
    return list(batches)


def _check_window(config, batches) -> None:
    """The calibration runs every layer with the first layer's attention mask; refuse where a
    sliding-window layer would need another one."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    longest = max(batch.shape[1] for batch in batches)
    sliding = any(t != "full_attention" for t in types) or (config.model_type == "mistral" and window)
    if sliding and window and longest > window:
        raise LorapError(
            f"calibration sequences of {longest} tokens exceed the sliding window ({window}); use shorter ones"
        )


# ---------------------------------------------------------------- shapes and parameter counts (no weights)


def plan_layout(config, kept_dim: int, tied_head: str = "untie", slice_head: bool = False) -> dict:
    """The sliced shapes (config.slicegpt, read by modeling_sliced.py) for a constant stream width d'."""
    d = config.hidden_size
    if not isinstance(kept_dim, int) or isinstance(kept_dim, bool) or not 1 <= kept_dim <= d:
        raise LorapError(f"the kept stream width must be a whole number from 1 to the hidden size {d}, not {kept_dim!r}")
    if tied_head not in TIED_HEAD_CHOICES:
        raise LorapError(f"tied_head must be one of {', '.join(TIED_HEAD_CHOICES)}, not {tied_head!r}")
    layers = [{"attention_in": kept_dim, "mlp_in": kept_dim, "out": kept_dim} for _ in range(config.num_hidden_layers)]
    if layers and not slice_head:
        layers[-1]["out"] = d
    tied = bool(getattr(config, "tie_word_embeddings", False)) and tied_head == "keep"
    return {
        "format": modeling_sliced.LAYOUT_FORMAT,
        "method": "SliceGPT (Ashkboos et al. 2024, arXiv 2401.15024)",
        "hidden_size": d,
        "rms_norm_eps": float(config.rms_norm_eps),
        "kept_dim": kept_dim,
        "embedding_dim": kept_dim,
        "layers": layers,
        "head": "tied" if tied else "untied",
        "head_sliced": bool(slice_head),
    }


def dense_parameters(config) -> int:
    """Parameters of the dense model (a tied embedding / head counts once)."""
    per_layer = sum(linear_parameters(i, o, b) for o, i, b in {**attention_shapes(config), **ffn_shapes(config)}.values())
    return per_layer * config.num_hidden_layers + other_parameters(config)


def layout_parameters(config, layout: dict) -> int:
    """Parameters of a sliced model from its layout and config alone (shortcut matrices included,
    weightless norms count nothing)."""
    attention, ffn = attention_shapes(config), ffn_shapes(config)
    vocab = config.vocab_size
    total = vocab * layout["embedding_dim"]
    for dims in layout["layers"]:
        a_in, m_in, out = dims["attention_in"], dims["mlp_in"], dims["out"]
        total += sum(linear_parameters(a_in, attention[n][0], attention[n][2]) for n in ("q_proj", "k_proj", "v_proj"))
        total += linear_parameters(attention["o_proj"][1], m_in, attention["o_proj"][2])
        total += sum(linear_parameters(m_in, ffn[n][0], ffn[n][2]) for n in ("gate_proj", "up_proj"))
        total += linear_parameters(ffn["down_proj"][1], out, ffn["down_proj"][2])
        total += a_in * m_in + m_in * out  # the two shortcut matrices
    width = modeling_sliced.final_width(layout)
    total += width * layout["embedding_dim"] if layout["head"] == "tied" else vocab * width
    return total


def sliced_parameters(config, kept_dim: int, tied_head: str = "untie", slice_head: bool = False) -> int:
    """Parameters of the model slice_model makes with stream width `kept_dim` (shapes alone)."""
    return layout_parameters(config, plan_layout(config, kept_dim, tied_head, slice_head))


def removed_share(config, kept_dim: int, tied_head: str = "untie", slice_head: bool = False) -> float:
    """Share of all the dense model's parameters removed (negative where slicing adds some)."""
    return 1.0 - sliced_parameters(config, kept_dim, tied_head, slice_head) / dense_parameters(config)


def choose_kept_dim(config, ratio: float, tied_head: str = "untie", slice_head: bool = False) -> int:
    """The stream width d' whose sliced model removes the share of all parameters nearest `ratio`,
    rounded to a multiple of 8 where that keeps the share within half a point of `ratio`."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise LorapError(f"the ratio of parameters to remove must lie in [0, 1), not {ratio!r}")
    d = config.hidden_size

    def share(k):
        return removed_share(config, k, tied_head, slice_head)

    # The share falls as d' grows: find the smallest d' removing at most `ratio` (binary search).
    if share(1) < ratio:
        raise LorapError(
            f"SliceGPT cannot remove {ratio:.1%} of this model's parameters: even a stream of 1 dim "
            f"removes only {share(1):.1%} (the head and embedding are not sliced away)"
        )
    low, high = 1, d
    if share(d) > ratio:
        low = d
    while low < high:
        middle = (low + high) // 2
        if share(middle) <= ratio:
            high = middle
        else:
            low = middle + 1
    candidates = [k for k in (low - 1, low) if 1 <= k <= d]
    best = min(candidates, key=lambda k: abs(share(k) - ratio))
    down = best - best % ROUND_MULTIPLE
    rounded = [k for k in (down, down + ROUND_MULTIPLE) if 1 <= k <= d and abs(share(k) - ratio) <= ROUND_TOLERANCE]
    return min(rounded, key=lambda k: abs(share(k) - ratio)) if rounded else best


# ---------------------------------------------------------------- the method


def _floats_as(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_floats_as(v, dtype) for v in value)
    return value


def _principal_basis(gram: torch.Tensor) -> tuple:
    """(eigenvalues descending, the orthogonal basis whose columns are their eigenvectors), float64."""
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def _kept_variance(values: torch.Tensor, kept: int) -> float:
    values = values.clamp(min=0)
    total = float(values.sum())
    return float(values[:kept].sum()) / total if total > 0 else 1.0


def _gram(rows: torch.Tensor) -> torch.Tensor:
    flat = rows.reshape(-1, rows.shape[-1]).double()
    return flat.T @ flat


def _new_linear(in_features, out_features, weight, bias, stored, compute):
    """A linear holding float64 `weight` (and `bias`) rounded to the stored dtype, run in `compute`."""
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=compute)
    with torch.no_grad():
        linear.weight.copy_(weight.to(stored))
        if bias is not None:
            linear.bias.copy_(bias.to(stored))
    return linear


def _rows_times(matrix: torch.Tensor, basis: torch.Tensor, dtype, chunk: int = 8192) -> torch.Tensor:
    """matrix @ basis in float64, a block of rows at a time (vocabulary-sized matrices)."""
    out = torch.empty(matrix.shape[0], basis.shape[1], dtype=dtype, device=matrix.device)
    for start in range(0, matrix.shape[0], chunk):
        out[start : start + chunk] = (matrix[start : start + chunk].double() @ basis).to(dtype)
    return out


class _InputRecorder:
    """Records the input of a module in each call (the attention heads before o_proj, the gated
    activations before down_proj)."""

    def __init__(self, module):
        self.seen = None
        self.handle = module.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        self.seen = args[0].detach()

    def take(self):
        seen, self.seen = self.seen, None
        return seen

    def remove(self):
        self.handle.remove()


@torch.no_grad()
def slice_model(model, calibration_batches, kept_dim: int | None = None, ratio: float | None = None,
                tied_head: str = "untie", slice_head: bool = False, progress: bool = False) -> dict:
    """Slice `model` (LLaMA, Mistral or Qwen2 causal LM) in place with SliceGPT.

    Give either `kept_dim` (the stream width d') or `ratio` (the share of all parameters to remove,
    embedding, head and shortcut matrices counted; d' is chosen by `choose_kept_dim`). The model
    becomes a modeling_sliced class with `config.slicegpt` (the layout) and `config.auto_map` set, so
    save_pretrained plus modeling_sliced.py is a checkpoint. Returns the layout, d', the parameter
    counts and share removed, and per block the share of calibration variance the kept dims hold."""
    check_supported(model)
    config = model.config
    batches = check_calibration(calibration_batches, config.vocab_size)
    if (kept_dim is None) == (ratio is None):
        raise LorapError("give SliceGPT either kept_dim or ratio, not both or neither")
    if tied_head not in TIED_HEAD_CHOICES:
        raise LorapError(f"tied_head must be one of {', '.join(TIED_HEAD_CHOICES)}, not {tied_head!r}")
    _check_window(config, batches)
    if kept_dim is None:
        kept_dim = choose_kept_dim(config, ratio, tied_head, slice_head)
    layout = plan_layout(config, kept_dim, tied_head, slice_head)
    dense = count_parameters(model)

    variance = _rotate_and_slice(model, batches, layout, progress)

    _mark_sliced(model, layout)
    sliced = count_parameters(model)
    return {
        "method": "slicegpt",
        "kept_dim": kept_dim,
        "hidden_size": config.hidden_size,
        "ratio_asked": ratio,
        "dense_parameters": dense,
        "sliced_parameters": sliced,
        "removed_share": 1.0 - sliced / dense,
        "tied_head": tied_head,
        "head": layout["head"],
        "layout": layout,
        "kept_variance": variance,
        "calibration": {"batches": len(batches), "sequences": sum(b.shape[0] for b in batches),
                        "tokens": sum(b.numel() for b in batches)},
    }


def _rotate_and_slice(model, batches, layout, progress) -> list:
    from ..pipeline.walk import capture_first_layer_inputs

    config = model.config
    inner = model.model
    d = config.hidden_size
    like = inner.embed_tokens.weight
    device, stored = like.device, like.dtype
    compute = torch.float32 if stored in (torch.float16, torch.bfloat16) and device.type == "cpu" else stored
    model.eval()

    captured = []
    for batch in batches:
        captured += capture_first_layer_inputs(model, batch, batch.shape[0], device)
    stream = [c.hidden.to(compute) for c in captured]  # the current block's input, in its sliced basis
    kwargs = [{k: _floats_as(v, compute) for k, v in c.kwargs.items()} for c in captured]
    del captured

    # The first basis: principal directions of the embeddings as the first layer sees them.
    values, first_basis = _principal_basis(sum(_gram(x) for x in stream))
    width = layout["embedding_dim"]
    variance = [{"embedding": _kept_variance(values, width)}]
    basis = first_basis  # of the stream entering the current block
    stream = [(x.double() @ basis[:, :width]).to(compute) for x in stream]

    for index, (layer, dims) in enumerate(tqdm(list(zip(inner.layers, layout["layers"])), desc="SliceGPT",
                                               unit="layer", disable=not progress)):
        basis, width, kept = _slice_layer(layer, dims, layout, stream, kwargs, basis, stored, compute, config.model_type)
        variance.append({"layer": index, **kept})

    _slice_ends(model, layout, first_basis, basis, stored)
    return variance


def _slice_layer(layer, dims, layout, stream, kwargs, basis, stored, compute, model_type):
    """Rotate and slice one decoder layer; `stream` (its input, in `basis` cut to dims["attention_in"])
    becomes its output in the returned basis cut to dims["out"]."""
    a_in, m_in, out = dims["attention_in"], dims["mlp_in"], dims["out"]
    attention, mlp = layer.self_attn, layer.mlp
    layer.to(dtype=compute)
    g_in = layer.input_layernorm.weight.double()
    g_post = layer.post_attention_layernorm.weight.double()
    modeling_sliced.set_sliced_norms_and_shortcuts(layer, dims, layout, model_type, attention.q_proj.weight)

    # Attention block: q/k/v read the (weightless-normed) stream in the incoming basis.
    into = basis[:, :a_in]
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attention, name)
        weight = (old.weight.double() * g_in) @ into
        bias = None if old.bias is None else old.bias.double()
        setattr(attention, name, _new_linear(a_in, old.out_features, weight, bias, stored, compute))
    heads, gram = _run_block(layer.input_layernorm, stream, kwargs, attention, attention.o_proj, into)
    values, mid_basis = _principal_basis(gram)
    mid = mid_basis[:, :m_in]
    o_old = attention.o_proj
    attention.o_proj = _new_linear(o_old.in_features, m_in, mid.T @ o_old.weight.double(),
                                   None if o_old.bias is None else mid.T @ o_old.bias.double(), stored, compute)
    _fill(layer.attn_shortcut, mid.T @ into, stored)  # (out, in) = Q_mid^T Q_in
    for position, hidden in enumerate(stream):
        stream[position] = layer.attn_shortcut(hidden) + attention.o_proj(heads[position])
    heads.clear()
    kept = {"attention": _kept_variance(values, m_in)}

    # MLP block: gate/up read the stream in the middle basis.
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        weight = (old.weight.double() * g_post) @ mid
        bias = None if old.bias is None else old.bias.double()
        setattr(mlp, name, _new_linear(m_in, old.out_features, weight, bias, stored, compute))
    # The gated activations (FFN width) are kept for the propagation unless they would take more than
    # KEEP_GATED_BYTES; then the MLP is run again with its sliced down_proj.
    tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden in stream)
    keep = tokens * mlp.down_proj.in_features * stream[0].element_size() <= KEEP_GATED_BYTES
    gated, gram = _run_block(layer.post_attention_layernorm, stream, None, mlp, mlp.down_proj, mid, keep)
    values, out_basis = _principal_basis(gram)
    leaving = out_basis[:, :out]
    down_old = mlp.down_proj
    mlp.down_proj = _new_linear(down_old.in_features, out, leaving.T @ down_old.weight.double(),
                                None if down_old.bias is None else leaving.T @ down_old.bias.double(), stored, compute)
    _fill(layer.mlp_shortcut, leaving.T @ mid, stored)
    for position, hidden in enumerate(stream):
        written = mlp.down_proj(gated[position]) if keep else mlp(layer.post_attention_layernorm(hidden))
        stream[position] = layer.mlp_shortcut(hidden) + written
    gated.clear()
    kept["mlp"] = _kept_variance(values, out)
    layer.to(dtype=stored)
    return out_basis, out, kept


def _run_block(norm, stream, kwargs, block, writer, basis, keep: bool = True):
    """Run `block` (attention or MLP, its writer still dense) on the normed stream. Returns the
    writer's inputs per batch (None for each without `keep`) and the float64 Gram matrix of the
    residual stream after the block, in dense coordinates (the stream mapped back through `basis`
    plus what the block writes)."""
    recorder = _InputRecorder(writer)
    inputs, gram = [], None
    try:
        for position, hidden in enumerate(stream):
            normed = norm(hidden)
            if kwargs is None:
                written = block(normed)
            else:
                written = block(hidden_states=normed, **kwargs[position])[0]
            seen = recorder.take()
            inputs.append(seen if keep else None)
            residual = hidden.double() @ basis.T + written.double()
            part = _gram(residual)
            gram = part if gram is None else gram + part
    finally:
        recorder.remove()
    return inputs, gram


def _fill(linear, weight, stored):
    with torch.no_grad():
        linear.weight.copy_(weight.to(stored))


def _slice_ends(model, layout, first_basis, last_basis, stored):
    """The embedding in the first basis, the final norm and the head reading the last one."""
    inner = model.model
    embedding = inner.embed_tokens.weight  # kept: the old head may share it
    head = model.lm_head
    g_final = inner.norm.weight.double()
    width = modeling_sliced.final_width(layout)
    modeling_sliced.set_sliced_ends(model, layout, embedding)
    kept_first = first_basis[:, : layout["embedding_dim"]]
    with torch.no_grad():
        inner.embed_tokens.weight.copy_(_rows_times(embedding, kept_first, stored))
        last = last_basis[:, :width]
        if layout["head"] == "tied":
            inner.norm.head_in.weight.copy_((kept_first.T @ (g_final[:, None] * last)).to(stored))
        else:
            model.lm_head.weight.copy_(_rows_times(head.weight, g_final[:, None] * last, stored))
            if head.bias is not None:
                model.lm_head.bias.copy_(head.bias)
    model.config.tie_word_embeddings = layout["head"] == "tied"


def _mark_sliced(model, layout: dict) -> None:
    """Record the layout in the config and give the model its modeling_sliced class (no new state),
    so save_pretrained writes a checkpoint AutoModelForCausalLM rebuilds with trust_remote_code."""
    config = model.config
    sliced_class = modeling_sliced.SLICED_CLASSES[config.model_type]
    model.__class__ = sliced_class
    setattr(config, modeling_sliced.LAYOUT_KEY, layout)
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{sliced_class.__name__}"}
    config.architectures = [sliced_class.__name__]


# ---------------------------------------------------------------- checkpoints


def save_sliced_checkpoint(model, tokenizer, out, overwrite: bool = False, reports: dict | None = None) -> Path:
    """Write a sliced model as a checkpoint folder (weights, config with `slicegpt` and `auto_map`,
    modeling_sliced.py, tokenizer, reports {file name: data}), atomically."""
    import shutil

    from ..io.checkpoint import check_output_folder, new_staging_folder, swap_into_place
    from ..io.files import write_json_atomic

    if getattr(model.config, modeling_sliced.LAYOUT_KEY, None) is None:
        raise LorapError("this model is not sliced (no config.slicegpt); run slice_model first")
    out = check_output_folder(out, overwrite)
    staging = new_staging_folder(out)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        shutil.copyfile(modeling_sliced.__file__, staging / MODELING_FILE)
        for name, data in (reports or {}).items():
            write_json_atomic(staging / name, data)
        swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def load_sliced_checkpoint(folder, **kwargs):
    """Load a sliced checkpoint with lorap's own modeling_sliced classes (no trust_remote_code)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, modeling_sliced.LAYOUT_KEY, None) is None:
        raise LorapError(f"{folder} is not a SliceGPT checkpoint (its config.json has no 'slicegpt' entry)")
    kwargs.setdefault("dtype", "auto")
    return modeling_sliced.SLICED_CLASSES[config.model_type].from_pretrained(folder, config=config, **kwargs)


def describe_share(config, kept_dim: int, tied_head: str = "untie", slice_head: bool = False) -> str:
    """One line for a plan: d', parameters and the exact share removed."""
    dense = dense_parameters(config)
    sliced = sliced_parameters(config, kept_dim, tied_head, slice_head)
    return (f"SliceGPT d'={kept_dim}/{config.hidden_size} ({1 - kept_dim / config.hidden_size:.1%} of the stream sliced): "
            f"{sliced:,} of {dense:,} parameters, {1 - sliced / dense:.2%} removed")


__all__ = [
    "slice_model", "sliced_parameters", "dense_parameters", "layout_parameters", "plan_layout", "choose_kept_dim",
    "removed_share", "check_supported", "save_sliced_checkpoint", "load_sliced_checkpoint", "describe_share",
]
