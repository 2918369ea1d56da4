"""Efficiency of a model as it runs: parameters, MACs per token, prefill latency, decode
throughput and peak memory.

MACs come from shapes (every nn.Linear, so a factorized projection's two thin linears and
a pruned FFN count as what they are) and are cross-checked with torch's FlopCounterMode.
Timings (bench/timing.py, the same code as `lorap bench`) use warm-up runs, then repeats; the
median is the number, and min / max / IQR show the spread. They depend on the machine and its
load: reports carry the device.
"""
from contextlib import contextmanager

import torch

from ..bench.timing import decode_throughput, prefill_latency
from ..devices import peak_memory_during
from ..plan.counting import count_parameters

PREFILL_SEQLENS = (128, 512)
MACS_SEQLEN = 128
# What `--speed` times unless told otherwise (measure's and speed_comparison's settings).
TIMING_DEFAULTS = {"prefill_seqlens": PREFILL_SEQLENS, "warmup": 2, "repeats": 5, "decode_tokens": 64,
                   "decode_prompt": 128}


def decode_prompt_length(context: int, decode_prompt: int, decode_tokens: int) -> int:
    """The prompt before the timed decode, shortened so that prompt and new tokens fit the context."""
    return max(1, min(decode_prompt, context - decode_tokens))


def _attention_widths(model) -> list:
    """[(query rows, key rows, value rows)] of each decoder layer, as its projections output them
    (fewer where heads were removed; a factor pair outputs full width). A family lorap does not
    know is read from its config: every layer the same."""
    from ..architectures import Architecture
    from ..errors import LorapError

    try:
        architecture = Architecture(model.config)
    except LorapError:
        layers, heads, head_dim = _attention_shape(model.config)
        kv = (getattr(model.config, "num_key_value_heads", None) or heads) * head_dim
        return [(heads * head_dim, kv, kv)] * layers
    return [tuple(architecture.projection(layer, name).out_features for name in ("q_proj", "k_proj", "v_proj"))
            for layer in architecture.decoder_layers(model)]


def kv_cache_bytes_per_token(model) -> int:
    """Bytes the KV cache grows by per token of context: every layer's key and value widths times
    the model's element size."""
    size = next(model.parameters()).element_size()
    return sum((keys + values) * size for _, keys, values in _attention_widths(model))


# ---------------------------------------------------------------- MACs


def _attention_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, head_dim


def macs_per_token(model, seqlen: int = MACS_SEQLEN) -> dict:
    """Multiply-accumulates per token of a batch-1 forward over `seqlen` tokens, from shapes.

    - linear: every nn.Linear (projections, FFN, LM head) does in x out MACs per token.
    - attention: scores Q K^T (heads x query/key dims x seqlen MACs per token per layer) and the
      weighted sum over V (heads x value dims x seqlen), with each layer's own head count and head
      dimensions where heads were removed or narrowed. The kernels compute the full seqlen x seqlen
      square and mask it, so this is what runs (a count of only the causal half would be about half).
    - rotary: the table of rotary angles is one [head_dim/2, 1] x [1, seqlen] product per
      forward, head_dim/2 MACs per token; negligible, counted so the total is exact.
    """
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    _, _, head_dim = _attention_shape(model.config)
    config = model.config
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    attention = sum(queries + values * group for queries, _, values in _attention_widths(model)) * seqlen
    rotary = head_dim // 2 if _has_rotary(model) else 0
    return {"seqlen": seqlen, "linear": linear, "attention": attention, "rotary": rotary, "total": linear + attention + rotary}


def _has_rotary(model) -> bool:
    return any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules())


@contextmanager
def _eager_attention(model):
    """FlopCounterMode has no formula for CPU's fused attention kernel, so it would miss the
    attention products; the eager path computes the same products as visible matmuls."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def counted_macs_per_token(model, seqlen: int = MACS_SEQLEN) -> float:
    """MACs per token as torch's flop counter sees one forward (FLOPs / 2 / seqlen)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    tokens = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    with _eager_attention(model), FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, use_cache=False)
    return counter.get_total_flops() / 2 / seqlen


# ---------------------------------------------------------------- all together


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(model, prefill_seqlens=PREFILL_SEQLENS, macs_seqlen: int = MACS_SEQLEN,
            warmup: int = TIMING_DEFAULTS["warmup"], repeats: int = TIMING_DEFAULTS["repeats"],
            decode_tokens: int = TIMING_DEFAULTS["decode_tokens"],
            decode_prompt: int = TIMING_DEFAULTS["decode_prompt"]) -> dict:
    """Every efficiency number for one model, as the report stores them."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None) or max(prefill_seqlens)
    seqlens = [s for s in prefill_seqlens if s <= limit]
    memory: dict = {}
    with peak_memory_during(device, memory):
        prefill = {str(s): prefill_latency(model, s, warmup, repeats) for s in seqlens}
        prompt = decode_prompt_length(limit, decode_prompt, decode_tokens)
        decode = decode_throughput(model, prompt, decode_tokens, 1, max(1, repeats // 2))
    shapes = macs_per_token(model, macs_seqlen)
    counted = counted_macs_per_token(model, macs_seqlen)
    return {
        "parameters": count_parameters(model),
        "weight_bytes": weight_bytes(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "macs_per_token": shapes,
        "macs_per_token_counted": counted,
        "macs_agree": abs(counted - shapes["total"]) <= 1e-9 * shapes["total"],
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "prefill": prefill,
        "decode": decode,
        "memory": memory,
        "settings": {"warmup": warmup, "repeats": repeats, "batch": 1, "threads": torch.get_num_threads()},
    }
