"""Peak host memory of a compression run, from shapes alone (what `lorap plan` prints)."""
import torch

from ..families import attention_shapes, ffn_shapes

# Python, torch, transformers, lorap and the tokenizer: 502 MiB measured when a streamed run starts its
# first pass (compression_report.json, peak_rss_mb_by_phase.before_passes)
RUNTIME_BASELINE_BYTES = 500 * 2**20
HALF_PRECISION_BYTES = 2  # float16 / bfloat16: a layer is computed in float32 while processed (pipeline/walk.py)
# CompressionConfig.whole_model_parts() names them so
TAYLOR_PARTS = ("ffn score llm-pruner-taylor", "head score llm-pruner-taylor")


def memory_estimate(model_config, plan, samples: int = 128, seqlen: int = 128, batch_size: int = 8, dtype_bytes=None,
                    gram_sources=(), whole_model_parts=()) -> dict:
    """Peak host memory of a compression run on a CPU, in bytes, from shapes alone.

    Streamed: the largest of (embeddings + captured activations), (LM head copied to the output),
    (the layer being processed, in float32 when stored in half precision, + activations + one
    batch's float32 working set + the largest per-layer step). The step is the largest of the
    statistics (the Gram matrices and one batch's float32 product), the attention phase (every Gram matrix the layer's methods collect, held together, + the float32
    copies of SVD, + SVD-LLM's float64 whitening of the widest attention input) and the FFN phase
    of the least-squares refit (its Gram matrix is freed once the kept-kept block, its solver copy
    and the kept-dropped block are formed). Taylor scores add their streamed backward pass (the
    LM head in float32, a batch of logits, the gradient store). Whole-model passes streamed before
    the walk (adaptive widths) hold less than the walk, so they do not raise the peak. In memory:
    the whole model instead of one layer. Each term was checked against measured peaks at LLaMA-7B
    width (docs/records/scaling.md).
    """
    if dtype_bytes is None:
        dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "float32"
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
    compute_bytes = 4 if dtype_bytes == HALF_PRECISION_BYTES else dtype_bytes
    d, m, vocab = model_config.hidden_size, model_config.intermediate_size, model_config.vocab_size
    heads = model_config.num_attention_heads
    attention = attention_shapes(model_config)
    matrices = [(o, i) for o, i, _ in attention.values()] + [(o, i) for o, i, _ in ffn_shapes(model_config).values()]
    layer = sum(o * i for o, i in matrices) + 2 * d
    embed = vocab * d
    head = 0 if getattr(model_config, "tie_word_embeddings", False) else vocab * d
    activations = samples * seqlen * d * dtype_bytes
    batch = min(batch_size, samples)
    working = 4 * batch * seqlen * (3 * m + heads * seqlen + 4 * d)
    decompose = 3 * 4 * max(o * i for o, i in matrices)
    gram_inputs = {"q_proj": d, "o_proj": attention["o_proj"][1], "gate_proj": d, "down_proj": m}
    grams = sum(8 * gram_inputs[name] ** 2 for name in gram_sources)  # float64, held together
    # the inputs a factorization whitens: attention's, and the FFN's when it is factorized too (--ffn lowrank)
    factorized_ffn = getattr(plan.settings, "ffn", "channels") == "lowrank"
    whitened = [gram_inputs[name] for name in gram_sources if name != "down_proj" or factorized_ffn]
    whitening = 4 * 8 * max(whitened) ** 2 if whitened else 0  # factor, whitened weight, SVD
    attention_phase = grams + decompose + whitening
    kept = max(layer_plan.ffn_width for layer_plan in plan.layers)
    ffn_phase = 8 * (2 * kept * kept + kept * (m - kept)) if "down_proj" in gram_sources and not factorized_ffn else 0
    widest = max((gram_inputs[name] for name in gram_sources), default=0)
    # while the calibration batches run: one batch's float32 product, counted whole (an upper bound:
    # statistics.py multiplies it a block of columns at a time where the width is cut)
    collection = grams + 4 * widest**2
    per_layer = activations + working + max(collection, attention_phase, ffn_phase)
    candidates = [embed * dtype_bytes + 2 * activations, head * dtype_bytes, layer * compute_bytes + per_layer]
    if set(TAYLOR_PARTS) & set(whole_model_parts):
        candidates.append((head or embed) * 4 + 3 * 4 * batch * seqlen * vocab + samples * seqlen * d * 4 + activations)
    streamed = RUNTIME_BASELINE_BYTES + max(candidates)
    in_memory = RUNTIME_BASELINE_BYTES + plan.dense_parameters * dtype_bytes + per_layer
    return {
        "checkpoint_bytes": plan.dense_parameters * dtype_bytes,
        "dtype_bytes": dtype_bytes,
        "calibration": {"samples": samples, "seqlen": seqlen},
        "activation_bytes": activations,
        "gram_bytes": grams,
        "in_memory_peak_bytes": in_memory,
        "streaming_peak_bytes": streamed,
        "whole_model_parts": ", ".join(whole_model_parts),  # streamed: a scoring pass over the shards first
    }


def format_memory_estimate(estimate: dict) -> str:
    gib = 2**30
    calibration = estimate["calibration"]
    return (
        f"memory estimate ({estimate['dtype_bytes']}-byte weights, calibration {calibration['samples']} x "
        f"{calibration['seqlen']}): checkpoint {estimate['checkpoint_bytes'] / gib:.1f} GiB; peak host memory "
        f"in memory {estimate['in_memory_peak_bytes'] / gib:.1f} GiB, streamed (--stream) "
        f"{estimate['streaming_peak_bytes'] / gib:.1f} GiB"
        + (f" (after a scoring pass over the shards for {estimate['whole_model_parts']})"
           if estimate["whole_model_parts"] else "")
    )
