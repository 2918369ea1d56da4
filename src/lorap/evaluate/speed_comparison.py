"""The speedup `lorap eval --speed` reports when it compares two models: both loaded together and
timed side by side by `lorap bench`'s code (bench/run.time_side_by_side), so `eval` and `bench`
give one number for one pair of models.

Each model's own efficiency entry is still measured alone, in its turn (its memory peak must be
its own); those medians come from moments minutes apart, on a shared machine at different speeds,
so their ratio is not the speedup. Where the two models would not fit in memory together, the
comparison falls back to that ratio and says so.
"""
import torch

from ..devices import free_memory_bytes
from ..log import info

# Both models' weights, times this, must fit in the memory available (activations, KV caches and
# the allocator's slack on top of the weights).
MEMORY_HEADROOM = 1.5


def fits_together(weight_bytes: list[int], device: str) -> tuple[bool, str]:
    """(whether models of these weight sizes fit on `device` together, and the figures why)."""
    needed = MEMORY_HEADROOM * sum(weight_bytes)
    free = free_memory_bytes(device)
    if free is None:
        return True, "available memory unknown"
    reason = f"{needed / 2**30:.1f} GiB needed for both, {free / 2**30:.1f} GiB available"
    return needed <= free, reason


def side_by_side(spec, other_spec, device: str, settings: dict, weight_bytes: list[int]) -> dict | None:
    """Paired speedups of `spec` over `other_spec` ({"prefill_speedup": {seqlen: x}, "decode_speedup":
    x, ...}, the quartiles beside them), or None when the two do not fit in memory together.
    `settings` are efficiency.measure's (prefill_seqlens, warmup, repeats, decode_tokens, decode_prompt)."""
    from ..bench.run import time_side_by_side
    from ..bench.settings import BenchTiming
    from ..io.models import load_model
    from .efficiency import TIMING_DEFAULTS, decode_prompt_length

    settings = {**TIMING_DEFAULTS, **settings}
    fits, reason = fits_together(weight_bytes, device)
    if not fits:
        info(f"speedup from separate timings: the two models do not fit in memory together ({reason})")
        return None
    models = {"dense": load_model(other_spec, device=device)[0], "compressed": load_model(spec, device=device)[0]}
    info("timing both models side by side for the speedup")
    limit = min(getattr(m.config, "max_position_embeddings", None) or 10**9 for m in models.values())
    seqlens = [s for s in settings["prefill_seqlens"] if s <= limit]
    prompt = decode_prompt_length(limit, settings["decode_prompt"], settings["decode_tokens"])
    timing = BenchTiming(seqlens, (1,), prompt, settings["decode_tokens"], settings["warmup"], settings["repeats"])
    prefill, decode = time_side_by_side(models, torch.device(device), timing)
    return {
        "prefill_speedup": {str(row["tokens"]): row["speedup"] for row in prefill.values()},
        "prefill_speedup_quartiles": {str(row["tokens"]): row["speedup_quartiles"] for row in prefill.values()},
        "decode_speedup": decode["speedup"],
        "decode_speedup_quartiles": decode["speedup_quartiles"],
        "speed_timing": "side by side: the median of per-round time ratios, the two models timed back to back "
                        "(decode: generating in lockstep, a token each in turn), lorap bench's code",
    }
