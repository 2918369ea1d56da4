"""`--align auto`: the multiple ranks and FFN widths are rounded to on this device.

Shapes the matrix kernels handle badly waste what compression saves (a rank of 1228 prefilled 1.04x
faster than dense on this CPU where 1216 gave 1.25x). The multiple is chosen per device by
measurement:

  cpu   16. It was chosen by a first measurement that compared the multiples with the row's
        average width per unit of width (16 ran 12% faster, 32 no better within 1%). That comparison
        favoured the few multiples of a large N wherever time hardly depends on the width, so it was
        replaced by one against each multiple's neighbours (table "align-choice-cpu" in
        docs/speed.md). On this shared 2-core machine the new one does not settle the choice. Every
        multiple from 8 to 64 gains at prefill and nothing at decode, the rows change order between
        runs, and two runs picked 64 (3 sweeps) and 32 (6 sweeps), each 2-4% ahead of 16 on average.
        16 stays until a steadier machine separates them: a new default changes every `--preset
        best` checkpoint, and with it every table of best in docs/.
  cuda  8, measured on an H200 in bf16 by `benchmarks/align_choice.py --device cuda` (table
        "align-choice-cuda"): on LLaMA shapes the multiples of 8 run 2.3-3.2x more width per second
        than their neighbours at 128 tokens and more (bf16 tensor-core kernels want multiples of 8);
        16 and 32 do no better, and 64 under 1% better.

With the multiple comes a limit on factor pairs: a pair runs two thin GEMMs where its dense
matrix runs one, so a pair just smaller than the matrix is slower than it. A pair larger than
its device's limit (PAIR_LIMITS, by the matrix's size) stays dense and its share of the budget goes to the rest
(plan/ranks.py). The limits are measured by benchmarks/pair_break_even.py (tables
"pair-break-even-cpu" and "pair-break-even-cuda" in docs/speed.md):

  cpu   depends on the matrix's size. Small matrices are bound by the cost of a call at decode: a
        SmolLM2-135M k/v pair (576 -> 192) was as fast as dense only up to 0.57 of its size, a
        q/o pair (576 -> 576) up to 0.62. LLaMA-sized ones are bound by their weights: a 4096 x
        1024 pair up to 0.93, a 4096 x 4096 pair up to 0.90 (prefill alone: 0.96 to 1.00). The
        limit of a matrix is interpolated in log(size) between the measured ones (the smaller
        of the decode and prefill crossovers), clamped at the ends.
  cuda  measured on an H200 in bf16 (table "pair-break-even-cuda"), and set from the 4096-token rows:
        a 4096 x 1024 pair up to 0.84, a 4096 x 4096 pair up to 0.93, smaller matrices clamped to
        0.84. At fewer tokens a GPU's time is set by the number of kernels, not by their sizes: in
        eager PyTorch every pair ran at 0.5-0.6x of its matrix whatever its rank, and replayed as a
        CUDA graph only a 4096 x 4096 pair below about half its size was faster. SmolLM2-sized
        matrices were at that floor even at 4096 tokens. No rank fixes a cost that does not depend
        on the rank, and keeping every pair dense would only move the budget to FFN channels that do
        not run faster there either. So the limit is taken where the time follows the shapes, and
        docs/speed.md reports GPU decode as measured: slower than dense in eager transformers.

The device is the one lorap computes on here (CUDA when available), as the model is most likely
served on the same kind. A multiple is never coarser than an eighth of the hidden size (tiny models
would otherwise lose their attention factor pairs to rounding), and where it cannot meet an exact
budget, half of it is tried, down to 1.
"""
import math

AUTO_ALIGN = "auto"  # what --align takes for "this device's multiple"
DEFAULT_ALIGN = {"cpu": 16, "cuda": 8}
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
