"""`--align auto`: the multiple ranks and FFN widths are rounded to on this device.

Shapes the matrix kernels handle badly waste what compression saves: the paper's unaligned 20%
shapes of LLaMA-7B (q/k rank 1228) gain far less at prefill than the same plan aligned (docs/records/speed.md,
section `speed`). The multiple is chosen per device from `benchmarks/align_choice.py`, which times
each multiple's widths against their neighbours (docs/records/speed.md, sections `align-choice-cpu` and
`align-choice-cuda`):

  cpu   16. Every multiple from 8 to 64 gains at prefill and nothing at decode, and the sweep does
        not separate them on a shared CPU (its rows change order between runs). 16 stays until a
        steadier machine separates them, because a new default changes every `--preset best`
        checkpoint and every table of best in docs/ (the record: docs/records/speed.md, the paragraph after
        section `align-choice-cpu`).
  cuda  8: bf16 tensor-core kernels want multiples of 8, which on LLaMA shapes run two to three
        times more width per second than their neighbours from 128 tokens up; coarser multiples do
        no better within 1%.

With the multiple comes a limit on factor pairs: a pair runs two thin GEMMs where its dense
matrix runs one, so a pair just smaller than the matrix is slower than it. A pair larger than
its device's limit (PAIR_LIMITS, by the matrix's size) stays dense and its share of the budget goes to the rest
(plan/ranks.py). The limits come from `benchmarks/pair_break_even.py` (docs/records/speed.md, sections
`pair-break-even-cpu` and `pair-break-even-cuda`):

  cpu   depends on the matrix's size. Small matrices are bound by the cost of a call at decode, so
        their pairs pay off only well below the matrix's size; LLaMA-sized ones are bound by their
        weights and pay off almost up to it. The limit of a matrix is interpolated in log(size) between
        the measured ones (the smaller of the decode and prefill crossovers), clamped at the ends.
  cuda  set from the 4096-token rows, where the time follows the shapes; smaller matrices take the
        smallest measured limit. At fewer tokens a GPU's time is set by the number of kernels, not
        by their sizes, a cost no rank lowers, and keeping every pair dense would only move the
        budget to FFN channels that run no faster there either (docs/records/speed.md, the paragraph after
        section `pair-break-even-cuda`).

The device is the one lorap computes on here (CUDA when available), as the model is most likely
served on the same kind. A multiple is never coarser than an eighth of the hidden size (tiny models
would otherwise lose their attention factor pairs to rounding), and where it cannot meet an exact
budget, half of it is tried, down to 1.
"""
import argparse
import math

AUTO_ALIGN = "auto"  # what --align takes for "this device's multiple"
DEFAULT_ALIGN = {"cpu": 16, "cuda": 8}


def parse_align(text: str):
    """--align's type: 'auto' or a positive whole number."""
    if text == AUTO_ALIGN:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1: no alignment) or '{AUTO_ALIGN}', got {text!r}")
    return value


FINEST_SHARE = 8  # the multiple is at most hidden_size / FINEST_SHARE
# (dense matrix weights, the largest pair size fraction that ran at least as fast: on cpu at decode
# and prefill, on cuda at 4096 tokens) by device; "none": every pair smaller than its matrix is used.
PAIR_LIMITS = {
    "none": (),
    "cpu": ((110_592, 0.57), (331_776, 0.62), (4_194_304, 0.93), (16_777_216, 0.90)),
    "cuda": ((4_194_304, 0.84), (16_777_216, 0.93)),
}


def device_kind() -> str:
    import torch  # here, so plans from shapes alone stay importable without it

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_default() -> int:
    return DEFAULT_ALIGN[device_kind()]


def pair_max_fraction(limit: str, weights: int) -> float:
    """The largest size fraction (pair weights / dense weights) at which a factor pair of a
    `weights`-sized matrix still runs faster on device `limit`; 1 where nothing was measured."""
    points = PAIR_LIMITS[limit]
    if not points:
        return 1.0
    if weights <= points[0][0]:
        return points[0][1]
    for (w0, f0), (w1, f1) in zip(points, points[1:]):
        if weights <= w1:
            t = (math.log(weights) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return f0 + t * (f1 - f0)
    return points[-1][1]


def default_alignments(config) -> list[int]:
    """The multiples to try for `config`, coarsest first, ending at 1."""
    align = device_default()
    while align > 1 and align > config.hidden_size // FINEST_SHARE:
        align //= 2
    candidates = [align]
    while candidates[-1] > 1:
        candidates.append(candidates[-1] // 2)
    return candidates
