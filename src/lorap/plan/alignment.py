"""`--align auto`: the multiple ranks and FFN widths are rounded to on this device.

Shapes the matrix kernels handle badly waste what compression saves (a rank of 1228 prefilled 1.04x
faster than dense on this CPU where 1216 gave 1.25x). The multiple is chosen per device by
measurement:

  cpu   16, measured by benchmarks/align_choice.py (table "align-choice-cpu" in docs/speed.md):
        multiples of 16 ran 12% faster per unit of width than the average width, 32 no better
        within 1%, 64 and 128 worse (memory-bound decode gains nothing from any of them).
  cuda  not measured by lorap yet (no GPU was available): 64, from the tile sizes of tensor-core
        GEMM kernels. `benchmarks/align_choice.py --device cuda` measures it.

The device is the one lorap computes on here (CUDA when available), as the model is most likely
served on the same kind. A multiple is never coarser than an eighth of the hidden size (tiny models
would otherwise lose their attention factor pairs to rounding), and where it cannot meet an exact
budget, half of it is tried, down to 1.
"""
AUTO_ALIGN = "auto"  # what --align takes for "this device's multiple"
DEFAULT_ALIGN = {"cpu": 16, "cuda": 64}
FINEST_SHARE = 8  # the multiple is at most hidden_size / FINEST_SHARE


def device_default() -> int:
    import torch  # here, so plans from shapes alone stay importable without it

    return DEFAULT_ALIGN["cuda" if torch.cuda.is_available() else "cpu"]


def default_alignments(config) -> list[int]:
    """The multiples to try for `config`, coarsest first, ending at 1."""
    align = device_default()
    while align > 1 and align > config.hidden_size // FINEST_SHARE:
        align //= 2
    candidates = [align]
    while candidates[-1] > 1:
        candidates.append(candidates[-1] // 2)
    return candidates
