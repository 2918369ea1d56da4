"""One GGUF file for llama.cpp: the `llama` architecture when every layer has the same shapes,
`deci` (per-layer `feed_forward_length` and `head_count_kv` arrays) when they differ.
"""
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import LorapError
from .dense import WEIGHT_DTYPES, DenseModel
from .gguf_vocab import add_tokenizer

# HF tensor name (inside a decoder layer) -> GGUF name; the same for `llama` and `deci`
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",  # FLAP's compensation of removed heads
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
MODEL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def gguf_architecture(dense: DenseModel) -> str:
    return "llama" if dense.uniform else "deci"


def interleave_rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q or k rows (or their bias) from HF's rotary layout (each head's first half pairs with
    its second half) to GGML's (pairs are adjacent), which llama.cpp's `llama` and `deci` rope expects."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(config, head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of LLaMA-3.1's rope scaling, as llama.cpp takes them (`rope_freqs`)."""
    scaling = config.rope_scaling
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    frequencies = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = []
    for frequency in frequencies.tolist():
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:  # in between, blend the two in proportion to where the wavelength lies
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _add_rope(writer, config, head_dim: int, tensors: dict) -> None:
    import gguf

    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_rope_dimension_count(head_dim)
    scaling = getattr(config, "rope_scaling", None)
    if not scaling:
        return
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(config, head_dim)
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    else:
        raise LorapError(f"rope scaling {kind!r} is not exported yet (supported: none, linear, llama3)")


def gguf_tensors(dense: DenseModel) -> dict:
    """{GGUF name: float32 tensor}, q and k rows reordered for GGML's rope."""
    tensors = {}
    for name, tensor in dense.tensors.items():
        if dense.tied_head_name(name):
            continue  # llama.cpp reuses token_embd when there is no output.weight
        if name in MODEL_TENSORS:
            tensors[MODEL_TENSORS[name]] = tensor
            continue
        _, _, index, local = name.split(".", 3)  # model.layers.{i}.{local}
        if local not in LAYER_TENSORS:
            raise LorapError(f"tensor {name} has no place in a GGUF llama layer")
        layer = int(index)
        if local.startswith("self_attn.q_proj."):
            tensor = interleave_rotary_halves(tensor, dense.head_counts[layer])
        elif local.startswith("self_attn.k_proj."):
            tensor = interleave_rotary_halves(tensor, dense.kv_head_counts[layer])
        tensors[f"blk.{layer}.{LAYER_TENSORS[local]}"] = tensor
    return tensors


def _stored_as(tensor: torch.Tensor, dtype: str) -> tuple:
    """(torch dtype, numpy dtype, GGML type or None) of `tensor` in a file of weight dtype `dtype`.
    Norms and biases stay float32, as llama.cpp's converter keeps them; bf16 is written as its bits
    in int16, tagged BF16."""
    import gguf

    if tensor.ndim == 1 or dtype == "f32":
        return torch.float32, np.dtype(np.float32), None
    if dtype == "f16":
        return torch.float16, np.dtype(np.float16), None
    return torch.bfloat16, np.dtype(np.int16), gguf.GGMLQuantizationType.BF16


def _numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    converted = tensor.to(_stored_as(tensor, dtype)[0]).contiguous()
    return (converted.view(torch.int16) if converted.dtype == torch.bfloat16 else converted).numpy()


def write_gguf(dense: DenseModel, tokenizer_folder: Path, tokenizer, path: Path, dtype: str, pre: str | None,
               name: str) -> dict:
    """Write `dense` and its tokenizer to the GGUF file `path`; returns what the file says."""
    import gguf

    if dtype not in WEIGHT_DTYPES:
        raise LorapError(f"GGUF dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    config, architecture = dense.config, gguf_architecture(dense)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    per_layer = (lambda values: int(values[0])) if architecture == "llama" else (lambda values: [int(v) for v in values])
    writer.add_feed_forward_length(per_layer(dense.ffn_widths))
    writer.add_head_count(per_layer(dense.head_counts))
    writer.add_head_count_kv(per_layer(dense.kv_head_counts))
    if dense.head_dim * dense.head_counts[0] != config.hidden_size:
        writer.add_key_length(dense.head_dim)
        writer.add_value_length(dense.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    tensors = gguf_tensors(dense)
    _add_rope(writer, config, dense.head_dim, tensors)
    vocab_rows = dense.tensors["model.embed_tokens.weight"].shape[0]
    writer.add_vocab_size(vocab_rows)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(int(file_type))
    tokenizer_record = add_tokenizer(writer, tokenizer_folder, tokenizer, vocab_rows, pre)
    # Tensor infos first, then each tensor converted and written alone: memory holds one converted
    # tensor at a time, not a second copy of the model.
    for tensor_name, tensor in tensors.items():
        _, numpy_dtype, raw = _stored_as(tensor, dtype)
        writer.add_tensor_info(tensor_name, list(tensor.shape), numpy_dtype, tensor.numel() * numpy_dtype.itemsize,
                               raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors.values():
        writer.write_tensor_data(_numpy(tensor, dtype))
    writer.close()
    return {"architecture": architecture, "dtype": dtype, "tensors": len(tensors), "tokenizer": tokenizer_record}
