"""A Hugging Face folder in the DeciLM / Nemotron-NAS layout, which vLLM's DeciLMForCausalLM serves:
LLaMA's tensor names (with Qwen2's q/k/v biases where it has them), and per-layer shapes in
`config.block_configs`.

The layout states each FFN width as `ffn_mult`, from which engines compute
    width = round_up(int(2 * ffn_mult * hidden / 3), 256),
so only multiples of 256 can be said exactly that way. For other widths the user chooses:
  refuse             stop with a message (the default: nothing is written that an engine misreads)
  pad                add zero channels up to the next multiple of 256: the same function (a zero
                     gate/up row gives silu(0) * 0 = 0 through a zero down column), more parameters
  intermediate-size  write `ffn.intermediate_size` instead of `ffn_mult`: exact and no padding, but
                     only engines that read that key (vLLM's DeciLMForCausalLM) can load it
"""
import json
import shutil
from pathlib import Path

import torch

from ..errors import LorapError
from ..methods.presets import SERVING_ALIGN
from . import configuration_decilm
from .choices import FFN_CHOICES
from .dense import WEIGHT_DTYPES, DenseModel

ENGINE_MULTIPLE = SERVING_ALIGN  # DeciLM's _find_multiple(width, 256); the serving preset aligns to it
CONFIG_FILE = Path(configuration_decilm.__file__).name
DROPPED_KEYS = ("lorap", "auto_map", "architectures", "model_type", "intermediate_size", "_name_or_path",
                "transformers_version", "torch_dtype", "dtype")


def round_up(width: int, multiple: int = ENGINE_MULTIPLE) -> int:
    return -(-width // multiple) * multiple


def ffn_section(width: int, hidden: int, choice: str) -> dict:
    if width % ENGINE_MULTIPLE == 0:
        return {"ffn_mult": width * 3 / (2 * hidden), "no_op": False, "replace_with_linear": False}
    if choice == "intermediate-size":
        return {"intermediate_size": width, "no_op": False, "replace_with_linear": False}
    raise AssertionError("widths are padded or refused before this point")


def padded_tensors(dense: DenseModel, widths: list) -> dict:
    """Dense tensors with each FFN grown to `widths` by zero channels (outputs unchanged)."""
    tensors = dict(dense.tensors)
    for layer, (old, new) in enumerate(zip(dense.ffn_widths, widths)):
        if new == old:
            continue
        prefix = f"model.layers.{layer}.mlp."
        for name in ("gate_proj", "up_proj"):
            weight = tensors[prefix + name + ".weight"]
            tensors[prefix + name + ".weight"] = torch.cat([weight, weight.new_zeros(new - old, weight.shape[1])])
        down = tensors[prefix + "down_proj.weight"]
        tensors[prefix + "down_proj.weight"] = torch.cat([down, down.new_zeros(down.shape[0], new - old)], dim=1)
    return tensors


def engine_widths(widths: list, choice: str) -> list:
    """The FFN widths the folder will state, by `choice` for those that are not multiples of 256."""
    if choice not in FFN_CHOICES:
        raise LorapError(f"--ffn-multiple must be one of {', '.join(FFN_CHOICES)}, got {choice!r}")
    odd = sorted({w for w in widths if w % ENGINE_MULTIPLE})
    if odd and choice == "refuse":
        raise LorapError(
            f"FFN widths {odd} are not multiples of {ENGINE_MULTIPLE}, which the DeciLM layout's ffn_mult cannot "
            "state exactly. Compress with --align 256 (or the serving preset), or pass --ffn-multiple pad (zero "
            "channels, same outputs, more parameters) or --ffn-multiple intermediate-size (exact; vLLM reads it)"
        )
    return [round_up(w) if choice == "pad" else w for w in widths]


def write_decilm(dense: DenseModel, tokenizer, folder: Path, dtype: str, choice: str) -> dict:
    """Write `dense` as a DeciLM folder into the (empty, staging) `folder`; returns what it holds."""
    config, hidden = dense.config, dense.config.hidden_size
    widths = engine_widths(dense.ffn_widths, choice)
    tensors = padded_tensors(dense, widths) if widths != dense.ffn_widths else dense.tensors
    mlp_bias = any(name.endswith("mlp.down_proj.bias") for name in tensors)
    if mlp_bias:  # the layout has one switch for all three FFN biases: the others are zeros
        tensors = dict(tensors)
        for layer, width in enumerate(widths):
            prefix = f"model.layers.{layer}.mlp."
            tensors.setdefault(prefix + "down_proj.bias", torch.zeros(hidden))
            tensors[prefix + "gate_proj.bias"] = torch.zeros(width)
            tensors[prefix + "up_proj.bias"] = torch.zeros(width)
    blocks = [
        {"attention": {"n_heads_in_group": heads // kv_heads, "no_op": False, "replace_with_linear": False},
         "ffn": ffn_section(width, hidden, choice)}
        for heads, kv_heads, width in zip(dense.head_counts, dense.kv_head_counts, widths)
    ]
    if set(dense.head_counts) != {config.num_attention_heads}:
        raise LorapError(
            f"this model has {sorted(set(dense.head_counts))} query heads per layer where its config states "
            f"{config.num_attention_heads}: the DeciLM layout has one query-head count for the whole model, the "
            "config's. Export a head-pruned model with --format gguf (llama.cpp reads per-layer head counts)"
        )
    settings = {key: value for key, value in config.to_dict().items() if key not in DROPPED_KEYS}
    settings.update(
        architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", block_configs=blocks, mlp_bias=mlp_bias,
        # Qwen2's q/k/v biases: DeciLM readers take `qkv_bias` for q, k and v, `attention_bias` for o
        qkv_bias=any(name.endswith("self_attn.q_proj.bias") for name in tensors), attention_bias=False,
        torch_dtype=str(WEIGHT_DTYPES[dtype]).removeprefix("torch."),
        auto_map={"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"},
    )
    settings.pop("num_key_value_heads", None)  # per layer now, in block_configs
    (folder / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    shutil.copyfile(configuration_decilm.__file__, folder / CONFIG_FILE)
    from safetensors.torch import save_file

    saved = {name: tensor.to(WEIGHT_DTYPES[dtype]).contiguous() for name, tensor in tensors.items()
             if not dense.tied_head_name(name)}
    save_file(saved, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    padding = sum(new - old for new, old in zip(widths, dense.ffn_widths))
    return {"engine_ffn_widths": widths, "padded_channels": padding,
            "parameters": sum(t.numel() for t in saved.values()), "mlp_bias": mlp_bias}
