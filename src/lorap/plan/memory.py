"""Peak host memory of a compression run, from shapes alone (what `lorap plan` prints)."""
import torch

from ..architectures import attention_shapes, ffn_shapes

RUNTIME_BASELINE_BYTES = 450 * 2**20  # Python + torch + transformers, measured (docs/scaling.md)


def memory_estimate(model_config, plan, samples: int = 128, seqlen: int = 128, batch_size: int = 8, dtype_bytes=None,
                    gram_sources=(), whole_model_parts=()) -> dict:
    """Peak host memory of a compression run, in bytes, from shapes alone.

    Streamed: the largest of (embeddings + captured activations), (LM head copied to the output),
    (two decoder layers + activations + one batch's float32 working set + float32 copies of the
    largest matrix for SVD / channel scores + the float64 Gram matrices some methods collect, with
    room for their factorisation). In memory: the whole model instead of two layers.
    """
    if dtype_bytes is None:
        dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32"
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
    d, m, vocab = model_config.hidden_size, model_config.intermediate_size, model_config.vocab_size
    heads = model_config.num_attention_heads
    matrices = [(o, i) for o, i, _ in attention_shapes(model_config).values()] + [
        (o, i) for o, i, _ in ffn_shapes(model_config).values()
    ]
    layer = sum(o * i for o, i in matrices) + 2 * d
    embed = vocab * d
    head = 0 if getattr(model_config, "tie_word_embeddings", False) else vocab * d
    activations = samples * seqlen * d * dtype_bytes
    working = 4 * min(batch_size, samples) * seqlen * (3 * m + heads * seqlen + 4 * d)
    decompose = 3 * 4 * max(o * i for o, i in matrices)
    gram_inputs = {"q_proj": d, "o_proj": attention_shapes(model_config)["o_proj"][1], "down_proj": m}
    grams = sum(3 * 8 * gram_inputs[name] ** 2 for name in gram_sources)  # the sum, a copy, a factor (float64)
    per_layer = activations + working + decompose + grams
    streamed = RUNTIME_BASELINE_BYTES + max(
        embed * dtype_bytes + 2 * activations, head * dtype_bytes, 2 * layer * dtype_bytes + per_layer
    )
    in_memory = RUNTIME_BASELINE_BYTES + plan.dense_parameters * dtype_bytes + per_layer
    return {
        "checkpoint_bytes": plan.dense_parameters * dtype_bytes,
        "dtype_bytes": dtype_bytes,
        "calibration": {"samples": samples, "seqlen": seqlen},
        "activation_bytes": activations,
        "gram_bytes": grams,
        "in_memory_peak_bytes": in_memory,
        "streaming_peak_bytes": None if whole_model_parts else streamed,  # None: these settings cannot stream
        "whole_model_parts": ", ".join(whole_model_parts),
    }


def format_memory_estimate(estimate: dict) -> str:
    gib = 2**30
    calibration = estimate["calibration"]
    return (
        f"memory estimate ({estimate['dtype_bytes']}-byte weights, calibration {calibration['samples']} x "
        f"{calibration['seqlen']}): checkpoint {estimate['checkpoint_bytes'] / gib:.1f} GiB; peak host memory "
        f"in memory {estimate['in_memory_peak_bytes'] / gib:.1f} GiB, streamed (--stream) "
        + (f"{estimate['streaming_peak_bytes'] / gib:.1f} GiB" if estimate["streaming_peak_bytes"] is not None
           else f"not possible with these settings ({estimate['whole_model_parts']}: a whole-model pass)")
    )
